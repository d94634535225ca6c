"""The sdtune studio: a Streamlit multipage app over `sdtune.studio.api` and the job queue.

Usage:
    sdtune studio                      # http://127.0.0.1:8501, this machine only
    sdtune studio --worker             # and a training worker beside it (`sdtune worker`)
    sdtune studio --expose             # listen on every interface (prints a warning: anyone who can reach it can
                                       # train, delete adapters and publish)
    streamlit run studio/app.py        # the same app, without the CLI's defaults

Every page is a `render()` in `sdtune.studio.views`; none imports torch (tests/test_layout.py), so the app starts
in about a second and torch loads only when a page renders images or estimates a run.
"""

from __future__ import annotations

import streamlit as st

from sdtune.studio.views import ab, datasets, jobs, publish, registry, train

PAGES = [
    st.Page(datasets.render, title="Datasets", icon=":material/photo_library:", url_path="datasets", default=True),
    st.Page(train.render, title="Train", icon=":material/model_training:", url_path="train"),
    st.Page(jobs.render, title="Jobs", icon=":material/queue:", url_path="jobs"),
    st.Page(registry.render, title="Registry", icon=":material/inventory_2:", url_path="registry"),
    st.Page(ab.render, title="A/B", icon=":material/compare:", url_path="ab"),
    st.Page(publish.render, title="Publish", icon=":material/publish:", url_path="publish"),
]


def main():
    st.set_page_config(page_title="sdtune studio", layout="wide")
    st.navigation(PAGES).run()


main()
