"""Registry page: browse adapters with their grids, manifests and scores; import a file with the import check's
report; tag; delete with confirmation; merge LoRAs (linear or SVD) with a preview grid of the result."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import streamlit as st

from sdtune.studio import api, jobs
from sdtune.studio.views.common import flash, show_flash, shown_errors

MERGE_METHODS = ("linear", "svd")


def render():
    st.title("Registry")
    show_flash()
    browse, importing, merging = st.tabs(["Browse", "Import", "Merge"], key="registry-tab", on_change="rerun")
    adapters = api.list_adapters()
    with browse:
        _browse(adapters)
    with importing:
        _import()
    with merging:
        _merge([a for a in adapters if a["method"] == "lora"])


def _browse(adapters: list[dict]):
    if not adapters:
        st.info("The registry is empty: finished runs register themselves (output.register), or import a file.")
        return
    tags = sorted({t for a in adapters for t in a.get("tags", [])})
    left, right = st.columns(2)
    method = left.selectbox("Method", ["(all)", *sorted({a["method"] for a in adapters})], key="reg-method")
    tag = right.selectbox("Tag", ["(all)", *tags], key="reg-tag")
    shown = [a for a in adapters if method in ("(all)", a["method"]) and tag in ("(all)", *a.get("tags", []))]
    st.dataframe(
        [
            {
                "name": a["name"],
                "method": a["method"],
                "kind": a.get("kind", a["method"]),
                "base": a["base"],
                "trigger": ", ".join(a["trigger_words"]),
                "tags": ", ".join(a.get("tags", [])),
                "origin": a.get("origin", ""),
            }
            for a in shown
        ],  # fmt: skip
        hide_index=True,
    )
    if not shown:
        return
    name = st.selectbox("Adapter", [a["name"] for a in shown], key="reg-selected")
    detail = api.show_adapter(name)
    manifest = detail["manifest"]
    folder = Path(detail["folder"])
    grids = [(label, folder / file) for label, file in manifest["samples"].items() if (folder / file).is_file()]
    for label, path in grids[:2]:
        st.image(str(path), caption=label, width="stretch")
    _downloads(folder, manifest["files"])
    if manifest.get("scores"):
        _scores(manifest["scores"])
    with st.expander("Manifest (adapter.json)"):
        st.json(manifest)
    _tags(name, detail.get("tags", []))
    _delete(name)


def score_tables(scores: dict) -> tuple[list[dict], list[dict]]:
    """adapter.json's toy-world `scores` as two small tables: one row per target prompt (the share of its images, one
    per seed, that show the asked colour and shape, for the base and the adapter; where the trainer measured each
    prompt, i.e. LoRA and DreamBooth), and one row per model over all targets (colour, shape, both, a ControlNet's
    layout IoU, and the number of images)."""
    per_prompt = scores.get("per_prompt") or {}
    prompts = [
        {
            "prompt": target["prompt"],
            "asks for": " ".join(filter(None, (target.get("color"), target.get("shape")))) or "(anything)",
            "base": per_prompt[target["prompt"]]["base"],
            "adapter": per_prompt[target["prompt"]]["adapter"],
        }
        for target in scores.get("targets", [])
        if target["prompt"] in per_prompt
    ]
    totals = []
    for side in ("base", "adapter"):
        measured = scores.get(side)
        if isinstance(measured, dict):
            row = {"model": side, **{k: measured[k] for k in ("color", "shape", "both", "iou") if k in measured}}
            totals.append({**row, "images": measured.get("n")})
    return prompts, totals


def _scores(scores: dict):
    prompts, totals = score_tables(scores)
    st.subheader("Scores")
    seeds = ", ".join(str(s) for s in scores.get("seeds", []))
    st.caption(f"Toy-world scorer: the share of images (seeds {seeds}) showing what each prompt asks for.")
    shares = {
        k: st.column_config.NumberColumn(format="percent") for k in ("base", "adapter", "color", "shape", "both")
    }
    if prompts:
        st.dataframe(prompts, hide_index=True, column_config=shares)
    if totals:
        st.dataframe(totals, hide_index=True, column_config=shares)


def _tags(name: str, current: list[str]):
    with st.form(f"tags-{name}"):
        add = st.text_input("Add tags (space-separated)", key=f"tags-add-{name}")
        remove = st.multiselect("Remove tags", current, key=f"tags-remove-{name}")
        if st.form_submit_button("Update tags"):
            with shown_errors():
                tags = api.tag_adapter(name, add.split(), remove)
                flash(f"{name}: tags {', '.join(tags) or '(none)'}")
                st.rerun()


def _delete(name: str):
    with st.expander("Delete"):
        sure = st.checkbox(f"Yes, delete {name} and its files", key=f"del-sure-{name}")
        if st.button("Delete adapter", key=f"del-{name}", disabled=not sure, type="primary"):
            with shown_errors():
                api.remove_adapter(name)
                flash(f"deleted {name}")
                st.rerun()


DOWNLOAD_LIMIT = 512 * 2**20  # a LoRA is MBs; a full model or ControlNet (GBs) is exported with the CLI instead


def _downloads(folder: Path, files: dict[str, str]):
    """A download button per weight file small enough to pass through the browser (read when clicked)."""
    small = [(fmt, folder / name) for fmt, name in files.items() if (folder / name).is_file()]
    small = [(fmt, path) for fmt, path in small if path.stat().st_size <= DOWNLOAD_LIMIT]
    for column, (fmt, path) in zip(st.columns(max(len(small), 1)), small):
        column.download_button(
            f"Download {path.name} ({fmt})", path.read_bytes, file_name=path.name, key=f"download-{fmt}"
        )


def _import():
    st.write("A LoRA (PEFT or kohya `.safetensors`), a ControlNet or a full model, checked against a base first.")
    upload = st.file_uploader("File", key="import-file")
    typed = st.text_input(
        "...or a file or folder on this machine",
        key="import-path",
        placeholder="~/.sdtune/jobs/3/run, /data/loras/style.safetensors",
        help="Read where it is, nothing uploaded: for folders (a diffusers ControlNet or full model) and large files. "
        "Only inside $SDTUNE_HOME or a folder the operator lists in SDTUNE_ALLOWED_DIRS (see the README); "
        "`sdtune adapters import` takes any path.",
    )
    left, right = st.columns(2)
    base = left.text_input("Base", "toy", key="import-base")
    name = right.text_input("Name (default: from the file)", key="import-name")
    if typed.strip():
        path = Path(typed.strip()).expanduser()
    elif upload is not None:
        path = None  # staged only while a button's action runs (`_staged`)
    else:
        return
    check, register = st.columns(2)
    if check.button("Check", key="import-check"):
        with shown_errors(), _staged(upload, path) as source:
            st.json(api.import_adapter(source, base=base, dry_run=True, confined=True)["report"])
    if register.button("Import", type="primary", key="import-go"):
        with shown_errors(), _staged(upload, path) as source:
            result = api.import_adapter(source, base=base, name=name or None, confined=True)
            st.success(f"imported {result['entry']['name']}")
            st.json(result["report"])


@contextlib.contextmanager
def _staged(upload, path: Path | None) -> Iterator[Path]:
    """`path` when one was typed; else the upload as a file (the importer reads paths, and names the adapter after
    the file) in a folder of its own under $SDTUNE_HOME/studio/uploads, removed when the action ends: the registry
    keeps its own copy, and a refused upload leaves nothing behind."""
    if path is not None:
        yield path
        return
    root = jobs.sdtune_home() / "studio" / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root, prefix="import-"))
    try:
        staged = folder / Path(upload.name).name
        staged.write_bytes(upload.getvalue())
        yield staged
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _merge(loras: list[dict]):
    if len(loras) < 2:
        st.info("Merging needs two registered LoRAs.")
        return
    with st.form("merge"):
        parents = st.multiselect("LoRAs to merge", [a["name"] for a in loras], key="merge-parents")
        c1, c2, c3 = st.columns(3)
        weights = c1.text_input("Weights (one per LoRA)", "1 1", key="merge-weights")
        method = c2.selectbox("Method", MERGE_METHODS, index=1, key="merge-method")
        rank = c3.number_input("Rank (SVD)", 1, 1024, 8, key="merge-rank")
        name = st.text_input("New name", f"merged-{time.strftime('%H%M%S')}", key="merge-name")
        prompt = st.text_input("Preview prompt", "a purple circle", key="merge-prompt")
        submitted = st.form_submit_button("Merge and preview")
    if not submitted:
        return
    with shown_errors(), st.spinner("merging and rendering the preview ..."):
        try:
            numbers = [float(w) for w in weights.split()]
        except ValueError:
            raise api.StudioError(f"weights: numbers separated by spaces, got {weights!r}") from None
        entry = api.merge_adapters(
            name, parents, numbers, method=method, rank=rank if method == "svd" else None, prompt=prompt
        )
        out = jobs.sdtune_home() / "studio" / "previews" / entry["name"]
        grid = api.sample_images(
            [prompt], out, seeds=[0, 1, 2, 3], base=entry["base"], adapters=[entry["name"]], grid=True
        )[-1]
        st.success(f"registered {entry['name']} ({method} merge of {', '.join(parents)})")
        st.image(str(grid), caption=f"{entry['name']}: {prompt}", width="stretch")
