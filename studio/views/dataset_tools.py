"""The Datasets page's model-made preparation: the Caption panel (a captioner or tagger over the dataset, with a
progress bar) and the Masks panel (threshold and fill controls per image, an overlay preview, the masks written as
the dataset's work/masks/, the folder `data.mask_dir` names).

Both call `sdtune.studio.api` (`caption_dataset`, `mask_preview`, `save_masks`), the functions `sdtune caption`
uses; writes go through the datasets store, so a frozen version a job trains on never changes. Imports no torch: a
captioner loads it when the button runs one.
"""

from __future__ import annotations

import streamlit as st

from sdtune.studio import api
from sdtune.studio.views.common import flash, shown_errors

MODES = {
    "missing": "only images without a caption (resumes a stopped run)",
    "replace": "replace every caption",
    "append": "append to the caption already there",
    "prefix": "the trigger word, then the new caption",
}


def caption_panel(name: str):
    """A captioner over the dataset's work copy: the model, the write mode, a dry run, and a progress bar."""
    with st.expander("Caption with a model"):
        st.table(
            [
                {"family": f["family"], "--model": f["model"], "here": "ready" if f["ready"] else f["note"]}
                for f in api.captioner_families()
            ]
        )
        with st.form("caption-run"):
            model = st.text_input(
                "Model", "toy", key="caption-model", help="toy, a model folder, or a Hub id (from the cache offline)"
            )
            mode = st.selectbox("Mode", list(MODES), format_func=lambda m: f"{m}: {MODES[m]}", key="caption-mode")
            trigger = st.text_input("Trigger word (put in front once)", key="caption-trigger")
            left, middle, right = st.columns(3)
            batch = left.number_input("Batch size", 1, 64, 8, key="caption-batch")
            general = middle.number_input("WD14 general threshold", 0.0, 1.0, 0.35, step=0.05, key="caption-gen")
            character = right.number_input("WD14 character threshold", 0.0, 1.0, 0.85, step=0.05, key="caption-chr")
            blacklist = st.text_input("WD14 blacklist (comma-separated tags)", key="caption-blacklist")
            dry_run = st.checkbox("Dry run: show what would change, write nothing", key="caption-dry")
            submitted = st.form_submit_button("Caption")
        if submitted:
            options = {"mode": mode, "trigger": trigger, "dry_run": dry_run, "batch_size": int(batch)}
            options |= {"general_threshold": general, "character_threshold": character}
            _run(name, model.strip() or "toy", options, [t.strip() for t in blacklist.split(",") if t.strip()])
        lines = st.session_state.pop("caption-lines", None)
        if lines:
            st.code("\n".join(lines), language=None)


def _run(name: str, model: str, options: dict, blacklist: list[str]):
    bar = st.progress(0.0, text=f"loading {model} ...")

    def progress(done: int, total: int):
        bar.progress(done / max(total, 1), text=f"captioned {done} of {total} images")

    with shown_errors():
        result = api.caption_dataset(name, model, blacklist=blacklist, progress=progress, **options)
        bar.progress(1.0, text="done")
        st.session_state["caption-lines"] = result["lines"]
        if not result["dry_run"] and result["changes"]:
            flash(result["lines"][-1])
            st.rerun()  # the counts, the tags and the grid change
        st.code("\n".join(st.session_state.pop("caption-lines")), language=None)


def masks_panel(name: str):
    """Per image: threshold, flood fill from the border, grow/shrink and invert, previewed over the image; saved as
    the mask of that image, or of every image with the same controls."""
    with st.expander("Masks (masked loss)"):
        st.caption(
            "White = learn, black = ignore. The background is the colour of the image's border; the mask is what "
            "differs from it by more than the threshold. Saved in the dataset's masks/ folder: a frozen version's "
            "masks/ is the recipe's data.mask_dir (with data.masked_loss)."
        )
        if not st.toggle("Edit masks", key=f"masks-{name}"):  # the preview decodes a full image: only on demand
            return
        files = [item["file"] for item in api.dataset_images(name)]
        if not files:
            st.info("No images yet: upload some in the Upload tab.")
            return
        file = st.selectbox("Image", files, key=f"mask-file-{name}")
        left, middle, right, last = st.columns(4)
        controls = {
            "threshold": left.slider("Threshold", 0.0, 1.0, 0.18, 0.01, key="mask-threshold"),
            "flood": middle.checkbox("Flood fill from the border", True, key="mask-flood"),
            "grow": right.slider("Grow (+) / shrink (-) px", -32, 32, 0, key="mask-grow"),
            "invert": last.checkbox("Invert", key="mask-invert"),
        }
        with shown_errors():
            preview = api.mask_preview(name, file, **controls)
            shown = st.columns(3)
            shown[0].image(preview["overlay"], caption=f"preview: learns {preview['coverage']:.0%}", width="stretch")
            shown[1].image(preview["mask"], caption="mask", width="stretch")
            if preview["current"]:
                shown[2].image(preview["current"], caption="saved mask", width="stretch")
            else:
                shown[2].info("no mask saved for this image yet")
        one, every = st.columns(2)
        if one.button("Save this mask", key="mask-save"):
            _save(name, [file], controls)
        if every.button("Save masks for every image (these controls)", key="mask-save-all"):
            _save(name, None, controls)


def _save(name: str, files: list[str] | None, controls: dict):
    with shown_errors():
        result = api.save_masks(name, files, **controls)
        message = f"{len(result['written'])} masks written to {result['mask_dir']}"
        skipped = "; ".join(f"{row['file']}: {row['reason']}" for row in result["skipped"])
        flash(message + (f"; skipped {skipped}" if skipped else ""), "warning" if skipped else "success")
        st.rerun()
