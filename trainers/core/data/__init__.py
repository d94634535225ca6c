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
- `buckets.py`: kohya's aspect-ratio buckets (never upscaling), the fit of an image to its bucket, and
  `BucketBatchSampler`;
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

from .buckets import BucketBatchSampler, assign_bucket, bucket_for, cover_crop, fit_to_bucket, make_buckets
from .captions import CaptionBuilder, tidy_caption
from .pairs import ConditionRecord, PairScan, condition_tensor, load_condition, scan_pairs
from .records import DataError, DatasetScan, ImageRecord, Skipped, format_preflight
from .sources import METADATA_FILES, load_image, load_mask, load_pixels, scan_dataset

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
