"""The training data shared by every trainer: find images and captions, refuse bad files, bucket by aspect ratio.

`scan_dataset(cfg)` reads a `DataConfig` and returns a `DatasetScan`: one `ImageRecord` per usable image (size,
caption, repeats, bucket, content hash) and one `Skipped` per rejected file with its reason. It loads no model and
decodes each image once, so the preflight summary (`format_preflight`) is printed before anything heavy starts.

One concern per module:

- `sources.py`: where images come from (plain and kohya folders, HF imagefolders, HF datasets), each checked once
  into an `ImageRecord`, and a record's pixels;
- `records.py`: what a scan finds (`ImageRecord`, `Skipped`, `DatasetScan`, `DataError`) and its preflight text;
- `captions.py`: `CaptionBuilder` (template -> tag shuffle -> dropout) with an rng the trainer derives from
  (seed, epoch, index), so a resumed run sees exactly the same captions;
- `buckets.py`: kohya's aspect-ratio buckets (never upscaling) and the fit of an image to its bucket (torch-free);
- `sampler.py`: `BucketBatchSampler`, batches of one bucket each;
- `masks.py`: masked loss: each image's mask (alpha channel or mask file), checked at scan time, fitted like its
  image (`load_mask`) and averaged to the latent grid;
- `pairs.py`: ControlNet's image + conditioning image pairs (`scan_pairs`).

Import every name from here. Example:

```py
>>> from sdtune.trainers.core.data import scan_dataset, format_preflight, BucketBatchSampler
>>> scan = scan_dataset(recipe.data)
>>> print(format_preflight(scan, recipe.data.resolution))
>>> sampler = BucketBatchSampler(scan.records, batch_size=4, seed=42)
```
"""

import importlib

# Each name is imported from its module on first use (PEP 562): `captions`, `records` and `buckets` are torch-free,
# so the studio can import them (a caption preview, the dataset report) without loading torch; the modules that
# read pixels into tensors (`sources`, `masks`, `pairs`, `sampler`) load it when a trainer asks for them.
_HOMES = {
    "sampler": ("BucketBatchSampler",),
    "buckets": ("assign_bucket", "bucket_for", "cover_crop", "fit_to_bucket", "make_buckets"),
    "captions": ("CaptionBuilder", "tidy_caption"),
    "pairs": ("ConditionRecord", "PairScan", "condition_tensor", "load_condition", "scan_pairs"),
    "records": ("DataError", "DatasetScan", "ImageRecord", "Skipped", "format_preflight"),
    "sources": ("METADATA_FILES", "load_image", "load_mask", "load_pixels", "scan_dataset"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


__all__ = [
    "METADATA_FILES",
    "BucketBatchSampler",
    "CaptionBuilder",
    "ConditionRecord",
    "DataError",
    "DatasetScan",
    "ImageRecord",
    "PairScan",
    "Skipped",
    "assign_bucket",
    "bucket_for",
    "condition_tensor",
    "cover_crop",
    "fit_to_bucket",
    "format_preflight",
    "load_condition",
    "load_image",
    "load_mask",
    "load_pixels",
    "make_buckets",
    "scan_dataset",
    "scan_pairs",
    "tidy_caption",
]
