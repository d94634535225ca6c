"""The Datasets page's preparation panels: the tag table with rename/remove and a training caption preview, the
duplicate groups side by side (keep one, drop the others), and the dataset report's picture.

Each panel calls `sdtune.studio.api` (the functions `sdtune dataset` uses too); edits go through the datasets store,
so a frozen version never changes. The page (views/datasets.py) places them; this module imports no torch (the
report's scan loads it when the button asks for a report).
"""

from __future__ import annotations

import hashlib

import streamlit as st

from sdtune.studio import api
from sdtune.studio.views.common import flash, shown_errors

TOP_TAGS = 50
PREVIEW_CAPTIONS = 200  # captions offered to the preview
THUMB_COLUMNS = 4


def tags_panel(name: str):
    """The tag (or word) frequency table, a rename/remove of one tag in every caption, and the caption preview."""
    with st.expander("Tags"):
        tags = api.dataset_tags(name)
        if not tags["rows"]:
            st.info("No captions yet: write some in the grid below, or upload .txt captions.")
            return
        st.caption(
            f"{len(tags['rows'])} {tags['kind']} across {tags['captions']} captions (captions that have each). "
            "Comma-separated captions count tags, prose captions words. The trigger word is in Bulk caption tools "
            "(added once: a caption that has it is left as it is)."
        )
        st.table(tags["rows"][:TOP_TAGS])
        with st.form("tag-edit", clear_on_submit=True):
            left, right = st.columns(2)
            old = left.selectbox("Tag", [row["tag"] for row in tags["rows"]], key="tag-old")
            new = right.text_input("Rename to", key="tag-new")
            rename, remove = st.columns(2)
            if rename.form_submit_button("Rename in every caption") and new.strip():
                _rename(name, old, new)
            if remove.form_submit_button("Remove from every caption"):
                _rename(name, old, "")
        _preview(name)


def _rename(name: str, old: str, new: str):
    with shown_errors():
        changed = api.rename_tag(name, old, new)
        flash(f"{old} -> {new.strip() or '(removed)'}: {changed} captions changed")
        st.rerun()


def _preview(name: str):
    """What a training step sees for one caption, under the recipe's caption keys (the trainer's CaptionBuilder)."""
    st.markdown("**Training caption preview**")
    captions = [item["caption"] for item in api.dataset_images(name) if item["caption"]][:PREVIEW_CAPTIONS]
    if not captions:
        return
    caption = st.selectbox("Caption to preview", captions, key="preview-caption")
    first, second, third = st.columns(3)
    shuffle = first.checkbox("shuffle_caption", key="preview-shuffle")
    keep = second.number_input("keep_tokens", 0, 32, 1, key="preview-keep", disabled=not shuffle)
    trigger = third.text_input("trigger_word", key="preview-trigger")
    template = st.text_input("caption_template", "{caption}", key="preview-template")
    with shown_errors():
        samples = api.caption_preview(
            caption,
            shuffle_caption=shuffle,
            keep_tokens=int(keep) if shuffle else 0,
            caption_template=template,
            trigger_word=trigger,
        )
        st.code("\n".join(samples), language=None)


def duplicates_panel(name: str, show_image):
    """Groups of exact and near-duplicate images, side by side; per group, keep one and drop the others.
    `show_image(path, label)` draws a thumbnail (the page's own, cached per file version)."""
    with st.expander("Duplicates"):
        st.caption(
            "Perceptual hash (64 bits, at most 10 apart) and colour layout: a re-encoded, resized or slightly "
            "brightened copy is grouped with its original; same pixels under another name or format is 'exact'."
        )
        if not st.toggle("Find duplicates", key=f"dupes-{name}"):
            return
        with shown_errors():
            found = api.dataset_duplicates(name)
            for row in found["unreadable"]:
                st.warning(f"skipped {row['file']}: {row['reason']}")
            if not found["groups"]:
                st.success("No duplicates.")
            for number, group in enumerate(found["groups"], 1):
                _group(name, number, group, show_image)


def _group(name: str, number: int, group: dict, show_image):
    kind = "exact: same pixels" if group["exact"] else f"near: up to {group['distance']} bits apart"
    st.markdown(f"**Group {number}** ({kind})")
    for row in range(0, len(group["files"]), THUMB_COLUMNS):
        pairs = list(zip(group["files"], group["paths"]))[row : row + THUMB_COLUMNS]
        for column, (file, path) in zip(st.columns(THUMB_COLUMNS), pairs):
            with column:
                show_image(path, file)
    key = hashlib.md5("|".join(group["files"]).encode()).hexdigest()[:10]  # the group, whatever its number
    keep = st.radio("Keep", group["files"], key=f"keep-{name}-{key}", horizontal=True)
    if st.button("Drop the others", key=f"drop-{name}-{key}"):
        with shown_errors():
            dropped = api.drop_duplicates(name, keep, group["files"])
            flash(f"kept {keep}; removed {', '.join(dropped)}")
            st.rerun()


def report_panel(name: str):
    """The dataset report: the picture `sdtune dataset report` writes, and its text."""
    st.subheader("Dataset report")
    st.caption(
        "Buckets at the resolution, image sizes, caption lengths in CLIP tokens, tags, duplicates, and what to fix "
        "(images without captions or masks, skipped files). The same as `sdtune dataset report`."
    )
    resolution = st.number_input("Report resolution", 8, 2048, 512, step=8, key="report-resolution")
    if st.button("Make the report", key="make-report"):
        with shown_errors(), st.spinner("scanning the images ..."):
            report = api.dataset_report(name, int(resolution))
            st.image(report["png"], width="stretch")
            st.code(report["text"], language=None)
