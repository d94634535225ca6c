"""Front ends: the `sdtune` command, the plain-data API it calls (`api.py`), and next the Streamlit studio."""
