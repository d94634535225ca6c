"""The sdtune studio (Streamlit). Its pages arrive with the studio issue; this package holds its namespace."""
