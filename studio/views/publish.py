"""Publish page: a registered adapter's model card preview, a dry run (the exact folder that would be uploaded), and
the push to the Hugging Face Hub. The token is typed into a password field inside a form that clears on submit: it
is passed to that one push and never written to session state, disk or logs."""

from __future__ import annotations

import time

import streamlit as st

from sdtune.studio import api, jobs
from sdtune.studio.views.common import shown_errors

PUSH_AGAIN = "paste the token and press “Push to the Hub” again"  # after a network failure (the token field clears)


def render():
    st.title("Publish")
    names = [a["name"] for a in api.list_adapters()]
    if not names:
        st.info("The registry is empty: train or import an adapter first.")
        return
    left, mid, right = st.columns([2, 2, 1])
    name = left.selectbox("Adapter", names, key="pub-name")
    repo = mid.text_input("Hub repo id", f"your-name/{name}", key=f"pub-repo-{name}")  # one per adapter
    private = right.checkbox("Private", True, key="pub-private")
    with shown_errors():
        preview = api.publish_preview(name, repo, private=private)
        _show_preview(preview)
    if st.button("Dry run: write the upload folder", key="pub-dry"):
        with shown_errors(), st.spinner("writing the folder ..."):
            out_dir = jobs.sdtune_home() / "studio" / "publish" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"  # new
            result = api.publish(name, repo, private=private, dry_run=True, out_dir=out_dir, token=None)
            st.success(f"dry run: nothing uploaded; the folder is {result.get('folder') or out_dir}")
            st.json({key: value for key, value in result.items() if key != "card"}, expanded=1)
    with st.form("pub-push", clear_on_submit=True):
        token = st.text_input(
            "Hugging Face token (write access; used for this push only, never stored)", type="password"
        )
        pushed = st.form_submit_button("Push to the Hub", type="primary")
    if pushed:
        with shown_errors(), st.spinner(f"uploading to {repo} ..."):
            if not token:
                raise api.StudioError("token: paste a Hugging Face write token to push (or use the dry run)")
            result = api.publish(
                name, repo, private=private, dry_run=False, out_dir=None, token=token, retry=PUSH_AGAIN
            )
            st.success(f"published: {result.get('url') or repo}")
        del token


def _show_preview(preview: dict):
    card = preview.get("card") or preview.get("readme") or ""
    files = preview.get("files") or []
    tab_card, tab_files = st.tabs(["Model card", "Files"])
    with tab_card:
        metadata, body = split_front_matter(card)
        with st.container(height=480):  # a long card scrolls; the actions below stay in view
            if metadata:
                st.caption("metadata (the card's YAML header: what the Hub indexes and shows as widgets)")
                st.code(metadata, language="yaml")
            st.markdown(body)
        with st.expander("README.md source"):
            st.code(card, language="markdown")
    with tab_files:
        st.table([f if isinstance(f, dict) else {"file": f} for f in files])
    for problem in preview.get("problems") or preview.get("warnings") or []:
        st.warning(problem)


def split_front_matter(card: str) -> tuple[str, str]:
    """A model card's YAML header and its markdown body: st.markdown would render the header as one run-on line."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            return card[4:end], card[end + 5 :]
    return "", card
