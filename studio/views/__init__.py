"""The Streamlit studio's pages, one module per page, each with a `render()` that `studio/app.py` registers with
`st.navigation`. Pages are thin views over `sdtune.studio.api` and `sdtune.studio.jobs`; none imports torch."""
