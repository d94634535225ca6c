"""The studio API: plain-data functions behind the `sdtune` command and the Streamlit studio.

Arguments and results are strings, numbers, lists, dicts and paths, so a UI page can call them without knowing
torch or diffusers. Importing this package stays cheap: torch, diffusers and the trainers' core load inside the
functions that need them (tests/test_layout.py holds that). Errors a user can fix raise `StudioError` with one line:
every public function goes through the one translator, `errors.translated`.

One module per concern; callers use the names re-exported here (`from sdtune.studio import api; api.sample_images`):
    errors        StudioError and the translator
    render        sample_images: a base with adapters and ControlNets, into PNGs
    models        whole models: convert_checkpoint, extract_lora, base_models
    registry      the adapter registry: list, import, export, tag, check; merge, resize, bake
    datasets      the workspace's datasets and their conditioning images
    dataset_prep  a dataset's tags, caption preview, duplicates and report
    captioning    captioners and taggers over a dataset or a folder
    masks         masks for masked loss from threshold and fill controls, with an overlay preview
    training      recipes, preflight, the job queue, doctor, a run's manifest
    comparisons   A/B comparisons, votes, checkpoint scoring, control images
    preference    votes as training pairs, and the preference run on them (queued or now)
    publishing    the Hugging Face Hub
"""

from __future__ import annotations

from sdtune.studio.api.captioning import caption_dataset, caption_folder, captioner_families
from sdtune.studio.api.comparisons import (
    BUNDLED_CONTROL_IMAGES,
    CONTROL_IMAGE_MAX_MB,
    ab_checkpoints,
    ab_compare,
    ab_get,
    ab_history,
    ab_tally,
    ab_vote,
    control_images,
    save_control_image,
)
from sdtune.studio.api.dataset_prep import (
    caption_preview,
    dataset_duplicates,
    dataset_report,
    dataset_tags,
    drop_duplicates,
    folder_duplicates,
    folder_report,
    rename_tag,
)
from sdtune.studio.api.datasets import (
    annotate_dataset,
    annotate_images,
    annotation_kinds,
    bulk_captions,
    create_dataset,
    dataset_images,
    dataset_info,
    dataset_subsets,
    dataset_thumbnail,
    freeze_dataset,
    list_datasets,
    remove_dataset_image,
    set_caption,
    upload_to_dataset,
)
from sdtune.studio.api.errors import StudioError
from sdtune.studio.api.masks import mask_preview, save_masks
from sdtune.studio.api.models import base_models, convert_checkpoint, extract_lora
from sdtune.studio.api.preference import queue_tune_from_votes, tune_from_votes, votes_summary
from sdtune.studio.api.publishing import publish, publish_preview
from sdtune.studio.api.registry import (
    bake_model,
    check_registry,
    export_adapter,
    import_adapter,
    list_adapters,
    lycoris_to_lora,
    merge_adapters,
    remove_adapter,
    resize_adapter,
    show_adapter,
    tag_adapter,
)
from sdtune.studio.api.render import DTYPE_NAMES, sample_images, scheduler_names
from sdtune.studio.api.training import (
    RECIPES_DIR,
    check_data,
    doctor_report,
    preflight,
    read_run,
    recipe_templates,
    recipe_text,
    submit_job,
    submit_sweep,
    validate_recipe,
)

__all__ = [
    "BUNDLED_CONTROL_IMAGES",
    "CONTROL_IMAGE_MAX_MB",
    "DTYPE_NAMES",
    "RECIPES_DIR",
    "StudioError",
    "ab_checkpoints",
    "ab_compare",
    "ab_get",
    "ab_history",
    "ab_tally",
    "ab_vote",
    "annotate_dataset",
    "annotate_images",
    "annotation_kinds",
    "bake_model",
    "base_models",
    "bulk_captions",
    "caption_dataset",
    "caption_folder",
    "caption_preview",
    "captioner_families",
    "check_data",
    "check_registry",
    "control_images",
    "convert_checkpoint",
    "create_dataset",
    "dataset_duplicates",
    "dataset_images",
    "dataset_info",
    "dataset_report",
    "dataset_subsets",
    "dataset_tags",
    "dataset_thumbnail",
    "doctor_report",
    "drop_duplicates",
    "export_adapter",
    "extract_lora",
    "folder_duplicates",
    "folder_report",
    "freeze_dataset",
    "import_adapter",
    "list_adapters",
    "mask_preview",
    "list_datasets",
    "merge_adapters",
    "preflight",
    "publish",
    "queue_tune_from_votes",
    "tune_from_votes",
    "votes_summary",
    "publish_preview",
    "read_run",
    "recipe_templates",
    "recipe_text",
    "remove_adapter",
    "remove_dataset_image",
    "rename_tag",
    "resize_adapter",
    "save_masks",
    "lycoris_to_lora",
    "sample_images",
    "save_control_image",
    "scheduler_names",
    "set_caption",
    "show_adapter",
    "submit_job",
    "submit_sweep",
    "tag_adapter",
    "upload_to_dataset",
    "validate_recipe",
]
