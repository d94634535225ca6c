"""The sdtune studio: a Streamlit multipage app over `sdtune.studio.api` and the job queue.

Usage:
    sdtune studio                      # http://127.0.0.1:8501/?token=..., this machine only
    sdtune studio --worker             # and a training worker beside it (`sdtune worker`)
    sdtune studio --expose             # listen on every interface (prints a warning: anyone who can reach it and
                                       # holds the token can train, delete adapters and publish)
    streamlit run studio/app.py        # the same app, without the CLI's defaults (the token is in
                                       # $SDTUNE_HOME/studio/token)

Every page is a `render()` in `sdtune.studio.views`; none imports torch (tests/test_layout.py), so the app starts
in about a second and torch loads only when a page renders images or estimates a run. No page runs before the
visitor has shown the studio's token (studio/access.py says what it protects and why).
"""

from __future__ import annotations

import streamlit as st

from sdtune.studio import access
from sdtune.studio.views import ab, datasets, jobs, publish, registry, sweeps, train

DATASETS = st.Page(datasets.render, title="Datasets", icon=":material/photo_library:", url_path="datasets")
PAGES = [
    DATASETS,
    st.Page(train.render, title="Train", icon=":material/model_training:", url_path="train"),
    st.Page(jobs.render, title="Jobs", icon=":material/queue:", url_path="jobs"),
    st.Page(sweeps.render, title="Sweeps", icon=":material/leaderboard:", url_path="sweeps"),
    st.Page(registry.render, title="Registry", icon=":material/inventory_2:", url_path="registry"),
    st.Page(ab.render, title="A/B", icon=":material/compare:", url_path="ab"),
    st.Page(publish.render, title="Publish", icon=":material/publish:", url_path="publish"),
]
TOKEN_KEY = "_sdtune_token"  # the token this browser session showed, so page links need not carry it


def _start():
    """The root URL. Streamlit serves its default page there and under no other URL, so Datasets as the default
    page made /datasets "Page not found": the root switches to Datasets at /datasets instead, token and all."""
    st.switch_page(DATASETS, query_params=st.query_params.to_dict())


START = st.Page(_start, title="sdtune studio", url_path="start", default=True, visibility="hidden")


def admitted() -> bool:
    """True when this session showed the studio's token (in the URL, or earlier in the session); otherwise the
    page is one line of refusal and nothing else runs."""
    if not access.token_required():
        st.sidebar.warning("No token (`sdtune studio --no-token`): every account on this machine can use this studio.")
        return True
    expected = access.studio_token()
    given = st.query_params.get("token") or st.session_state.get(TOKEN_KEY)
    if not access.same_token(given, expected):
        st.error(access.REFUSAL)
        return False
    st.session_state[TOKEN_KEY] = given
    if st.query_params.get("token") != given:  # a page link dropped it: keep the URL one that reloads
        st.query_params["token"] = given
    return True


def main():
    st.set_page_config(page_title="sdtune studio", layout="wide")
    if admitted():
        st.navigation([START, *PAGES]).run()


main()
