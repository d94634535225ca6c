"""Sweeps page: a sweep's leaderboard (studio/leaderboard.py, what `sdtune jobs sweep show` prints), ranked by the
chosen metric; the top runs rendered side by side at fixed seeds; a blind A/B of the two best, voted on the A/B
page. Sweeps are queued from the Train page (or `sdtune jobs sweep`); the worker runs them like any job."""

from __future__ import annotations

import streamlit as st

from sdtune.studio import leaderboard, sweeps
from sdtune.studio.views.common import shown_errors


def render():
    st.title("Sweeps")
    found = sweeps.list_sweeps()
    if not found:
        st.info(
            "No sweeps yet: queue one from the Train page (Sweep) or with `sdtune jobs sweep recipe.yaml AXIS...`."
        )
        return
    names = [sweep.name for sweep in found]
    if st.session_state.get("sweeps-selected") not in names:
        st.session_state["sweeps-selected"] = names[0]
    left, right = st.columns(2)
    name = left.selectbox("Sweep", names, key="sweeps-selected")
    rank_by = right.selectbox("Rank by", list(leaderboard.METRICS), key="sweeps-rank-by", help=_metrics_help())
    board = leaderboard.leaderboard(name, rank_by)
    st.caption(f"{leaderboard.runs_line(board)}; axes: {', '.join(p for p, _ in board['sweep']['axes'])}")
    rows = [_shown(row, board) for row in board["rows"]]
    if not rows:  # its jobs gone from jobs.db (a copied or older file): nothing to rank, the rest of the page stands
        st.info(f"Sweep {name} has no runs in the job queue.")
        return
    measured = [key for key in rows[0] if any(row[key] is not None for row in rows)]  # no column of "None"s
    st.dataframe([{key: row[key] for key in measured} for row in rows], hide_index=True)
    for row in board["rows"]:  # the whole reason, which the table's cell cuts off
        if row["problem"]:
            st.warning(f"job {row['job']}: not measured: {row['problem']}")
    _actions(board)


def _metrics_help() -> str:
    higher = {True: "higher is better", False: "lower is better"}
    return "; ".join(f"{name}: {text} ({higher[up]})" for name, (text, up) in leaderboard.METRICS.items())


def _shown(row: dict, board: dict) -> dict:
    best = None if row["best_checkpoint"] is None else f"{row['best_checkpoint']} (step {row['best_step']})"
    memory = None if row["peak_memory"] is None else round(row["peak_memory"] / 2**20)
    return {"rank": row["rank"], "job": row["job"], **row["values"], "state": row["state"],
            "attempts": row["attempts"], "score": row["score"], "color": row["color"], "shape": row["shape"],
            "iou": row["iou"], "val_loss": row["val_loss"], "best checkpoint": best, "s/step": row["step_time"],
            "peak MiB": memory, "not measured because": row["problem"]}  # fmt: skip


def _actions(board: dict):
    left, middle, right = st.columns(3)
    top = left.number_input("Top runs in the grid", min_value=1, max_value=8, value=3, key="sweeps-top")
    steps = middle.number_input("Sampling steps", min_value=1, max_value=100, value=25, key="sweeps-steps")
    if left.button("Render the top runs", key="sweeps-grid"):
        with shown_errors(), st.spinner("rendering the best checkpoints ..."):
            path = leaderboard.top_grid(board, int(top), steps=int(steps))
            st.session_state["sweeps-grid"] = (board["sweep"]["name"], str(path))
    if right.button("Blind A/B of the two best", key="sweeps-ab"):
        with shown_errors(), st.spinner("rendering both sides ..."):
            comparison = leaderboard.ab_top(board, 2, steps=int(steps))
            st.success(
                f"blind A/B {comparison['id']} started: vote on the A/B page or `sdtune ab vote {comparison['id']}`"
            )
    shown_for, path = st.session_state.get("sweeps-grid") or (None, None)
    if shown_for == board["sweep"]["name"]:
        st.image(path, caption="the best checkpoint of each top run, at the same prompts and seeds")
