"""Datasets page: upload images or zips, edit captions one by one or in bulk, preview buckets and the preflight,
make ControlNet conditioning images, and freeze versions that jobs train on.

Images are shown as thumbnails of what the trainers see (`api.dataset_thumbnail`); one that cannot be shown is a
warning with its reason, never an error that takes the page down. Zips keep their folders: kohya `N_concept`
subsets are listed with their repeats and picked in the caption grid; the preflight can read each folder as one of
`data.subsets` (some marked is_reg), listed with the recipe lines that say so.
"""

from __future__ import annotations

import hashlib
import os

import streamlit as st
import yaml

from sdtune.studio import api
from sdtune.studio.views import dataset_report, dataset_tools
from sdtune.studio.views.common import flash, show_flash, shown_errors, uploads
from sdtune.trainers.core.recipe import override_text

PER_PAGE = 24
COLUMNS = 6


def render():
    st.title("Datasets")
    show_flash()
    names = [d["name"] for d in api.list_datasets()]
    pick, create = st.columns([3, 2], vertical_alignment="bottom")
    with create.form("new-dataset", clear_on_submit=True, border=False):
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        new = left.text_input("New dataset", placeholder="e.g. purple")
        if right.form_submit_button("Create") and new:
            with shown_errors():
                api.create_dataset(new.strip())
                st.session_state["dataset"] = new.strip()
                st.rerun()
    if not names:
        pick.info("No dataset yet: name one and press Create, then upload images.")
        return
    if st.session_state.get("dataset") not in names:
        st.session_state["dataset"] = names[0]
    name = pick.selectbox("Dataset", names, key="dataset")
    info = api.dataset_info(name)
    in_folders = f" in {len(info['folders'])} folders" if len(info["folders"]) > 1 else ""
    st.caption(
        f"{info['images']} images{in_folders}, {info['captioned']} captioned, {info['conditioning']} conditioning "
        f"images | fingerprint {info['fingerprint'][:12]} | {info['work_dir']}"
    )
    upload_tab, captions_tab, preflight_tab, control_tab, versions_tab = st.tabs(
        ["Upload", "Captions", "Buckets & preflight", "ControlNet conditioning", "Versions"],
        key="datasets-tab",
        on_change="rerun",  # a keyed tab stays selected when an action reruns the page
    )
    with upload_tab:
        _upload(name)
    with captions_tab:
        _bulk_tools(name)
        dataset_report.tags_panel(name)
        dataset_report.duplicates_panel(name, _show_image)
        dataset_tools.caption_panel(name)
        dataset_tools.masks_panel(name)
        _grid(name, info)
    with preflight_tab:
        _preflight(name, info)
        dataset_report.report_panel(name)
    with control_tab:
        _conditioning(name)
    with versions_tab:
        _versions(name, info)


def _upload(name: str):
    st.write(
        "Images (png, jpg, webp, bmp), same-name `.txt` captions, or a `.zip` of them. A zip keeps its folders: "
        "kohya's `10_concept/` folders are subsets trained 10 times per epoch."
    )
    with st.form("upload", clear_on_submit=True):
        files = st.file_uploader("Files", accept_multiple_files=True, key="upload-files")
        submitted = st.form_submit_button("Add to dataset")
    if submitted and files:
        with shown_errors():
            report = api.upload_to_dataset(name, uploads(files))
            flash(_upload_message(report), "warning" if report["replaced"] else "success")
            st.session_state["upload-rejected"] = report["rejected"]
            st.rerun()  # the counts and the grid above change
    rejected = st.session_state.pop("upload-rejected", None)
    if rejected:
        st.warning(f"rejected {len(rejected)} files:")
        st.table([{"file": r["file"], "reason": r["reason"]} for r in rejected])


def _upload_message(report: dict) -> str:
    """What was written, counted from the files written, with the folders they went into."""
    message = f"added {len(report['written'])} images"
    folders = sorted({file.split("/")[0] for file in report["written"] if "/" in file})
    if folders:
        message += f" (into {', '.join(folders)})"
    message += f" and {len(report['captions'])} captions"
    if report["replaced"]:  # the frozen versions keep the old files
        names = ", ".join(report["replaced"][:5]) + (" ..." if len(report["replaced"]) > 5 else "")
        message += f"; {len(report['replaced'])} replaced a different file of the same name ({names})"
    return message


def _bulk_tools(name: str):
    with st.expander("Bulk caption tools"):
        with st.form("bulk", clear_on_submit=True):  # a second click must not apply the edits twice
            trigger = st.text_input("Trigger word (added to every caption that lacks it)")
            left, right = st.columns(2)
            find = left.text_input("Find")
            replace = right.text_input("Replace with")
            template = st.text_input("Template", placeholder="a photo of {trigger}, {caption}  ({name}: file stem)")
            if st.form_submit_button("Apply to all captions"):
                with shown_errors():
                    changed = api.bulk_captions(name, trigger=trigger, find=find, replace=replace, template=template)
                    flash(f"{changed} captions changed")
                    st.rerun()


def _grid(name: str, info: dict):
    everything = api.dataset_images(name)
    if not everything:
        st.info("No images yet: upload some in the Upload tab.")
        return
    items, folder = everything, ""
    if any(row["folder"] for row in info["folders"]):  # subfolders: one at a time
        folder = _pick_folder(name, info["folders"])
        items = [item for item in everything if item["folder"] == folder]
    pages = (len(items) - 1) // PER_PAGE + 1
    # keyed per folder: a page number kept from a longer folder could lie past this one's end
    page = st.number_input("Page", 1, pages, 1, key=f"grid-page-{name}-{folder}") if pages > 1 else 1
    shown = items[(page - 1) * PER_PAGE : page * PER_PAGE]
    with st.form("captions"):
        edited = {}
        for row in range(0, len(shown), COLUMNS):
            for column, item in zip(st.columns(COLUMNS), shown[row : row + COLUMNS]):
                with column:
                    _show_image(item["path"], item["file"])
                    if item["caption_error"]:
                        st.warning(item["caption_error"])
                        continue  # nothing to edit: saving would replace a file the page could not read
                    # The key follows the caption on disk, so a bulk edit shows at once.
                    key = f"cap-{name}-{item['file']}-{hashlib.md5(item['caption'].encode()).hexdigest()[:8]}"
                    edited[item["file"]] = (
                        item["caption"],
                        st.text_area("Caption", item["caption"], key=key, height=80),
                    )
        if st.form_submit_button("Save captions"):
            with shown_errors():
                changed = [f for f, (old, new) in edited.items() if new.strip() != old]
                for file in changed:
                    api.set_caption(name, file, edited[file][1])
                flash(f"saved {len(changed)} captions")
                st.rerun()
    with st.expander("Remove an image"):
        file = st.selectbox("Image", [i["file"] for i in everything], key="remove-file")
        if st.button("Remove image", key="remove-image"):
            with shown_errors():
                api.remove_dataset_image(name, file)
                flash(f"removed {file}")
                st.rerun()


def _preflight(name: str, info: dict):
    templates = list(api.recipe_templates("lora"))
    template = st.selectbox(
        "Recipe template", templates, index=templates.index("quickstart.yaml") if "quickstart.yaml" in templates else 0
    )
    resolution = st.number_input("Resolution", 8, 2048, 64 if template == "quickstart.yaml" else 512, step=8)
    data = _subsets(name, info) or [f"data.train_data_dir={info['work_dir']}/images"]
    if st.button("Run preflight", key="run-preflight"):
        overrides = [*data, f"data.resolution={resolution}"]
        with shown_errors(), st.spinner("scanning the images and estimating ..."):
            result = api.preflight(api.recipe_text(template), overrides)
            st.subheader("Buckets (images per epoch)")
            st.bar_chart(result["buckets"], x_label="bucket (width x height)", y_label="images")
            st.code(result["report"], language=None)


def _subsets(name: str, info: dict) -> list[str]:
    """A dataset in folders, as `data.subsets` if asked: each folder a subset with its repeats and the caption of its
    uncaptioned images, some maybe regularization (is_reg); shows them and the recipe lines, and returns the preflight's
    data overrides (none otherwise: the preflight reads images/ as one folder)."""
    folders = [row["folder"] for row in info["folders"] if row["folder"]]
    if not folders or not st.checkbox("Each folder as a subset (data.subsets)", key=f"as-subsets-{name}"):
        return []
    reg = st.multiselect(
        "Regularization folders (is_reg: images of the class, paired with the training images)",
        folders,
        key=f"reg-folders-{name}",
    )
    with shown_errors():
        subsets = api.dataset_subsets(name, reg)
        images = {row["folder"]: row["images"] for row in info["folders"]}
        st.table(
            [
                {
                    "subset": folder,
                    "images": images[folder],
                    "num_repeats": str(subset["num_repeats"]),
                    "is_reg": "yes" if subset["is_reg"] else "",
                    "class_tokens": subset["class_tokens"] or "",
                }
                for folder, subset in zip(folders, subsets)
            ]
        )
        top = images.get("", 0)
        if top:
            st.warning(f"{top} images at the top of the dataset are in no subset: move them into a folder")
        st.caption("In a recipe (the preflight below reads them so):")
        st.code(yaml.safe_dump({"data": {"subsets": subsets}}, sort_keys=False), language="yaml")
        return ["data.train_data_dir=null", override_text("data.subsets", subsets)]
    return []


def _conditioning(name: str):
    kinds = api.annotation_kinds()["no_weights"]
    kind = st.selectbox("Annotator", kinds, key="annotate-kind")
    low, high = st.slider("Canny thresholds (low, high)", 0, 255, (100, 200), key="annotate-thresholds")
    if st.button("Make conditioning images", key="annotate"):
        with shown_errors(), st.spinner("annotating ..."):
            written = api.annotate_dataset(name, kind, low_threshold=low, high_threshold=high)
            flash(f"{len(written)} {kind} conditioning images written")
            st.rerun()
    pairs = [i for i in api.dataset_images(name) if i["conditioning"]]
    if pairs:
        st.subheader("Preview: image | conditioning")
        for item in pairs[:4]:
            left, right = st.columns(2)
            with left:
                _show_image(item["path"], item["file"])
            with right:
                _show_image(item["conditioning"], "conditioning")


def _versions(name: str, info: dict):
    st.write("A job trains on a frozen version, never on the editable copy, so it records exactly what it saw.")
    if st.button("Freeze a version now", key="freeze"):
        with shown_errors():
            version = api.freeze_dataset(name)
            flash(f"{version['version']}: {version['images']} images, fingerprint {version['fingerprint'][:12]}")
            st.rerun()
    if info["versions"]:
        st.table(
            [
                {
                    "version": v["version"],
                    "images": v["images"],
                    "fingerprint": v["fingerprint"][:16],
                    "path": v["path"],
                }
                for v in reversed(info["versions"])
            ]
        )


def _pick_folder(name: str, folders: list[dict]) -> str:
    """Shows the folders as the trainers read them (repeats, the caption of uncaptioned images); returns the one
    picked for the grid."""
    st.table(  # a table, not a dataframe: plain text a user (and the browser test) can read and copy
        [
            {
                "folder": row["folder"] or "(top level)",
                "repeats": str(row["repeats"]) if row["repeats"] is not None else "the recipe's data.repeats",
                "images": row["images"],
                "captioned": row["captioned"],
                "caption if none": row["concept"],
            }
            for row in folders
        ]
    )
    labels = {row["folder"]: f"{row['folder'] or '(top level)'} ({row['images']} images)" for row in folders}
    return st.selectbox("Folder", list(labels), format_func=labels.get, key=f"grid-folder-{name}")


def _show_image(path: str, label: str):
    """A thumbnail of the image as it trains, or a warning with the reason it cannot be shown."""
    try:
        stat = os.stat(path)
        st.image(_thumbnail(path, stat.st_mtime_ns, stat.st_size), caption=label, width="stretch")
    except (api.StudioError, OSError) as exc:
        st.warning(f"{label}: {exc}" if isinstance(exc, OSError) else str(exc))


@st.cache_data(max_entries=1024, show_spinner=False)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """Cached per file version (mtime and size are part of the key): a rerun redraws the grid without decoding."""
    return api.dataset_thumbnail(path)
