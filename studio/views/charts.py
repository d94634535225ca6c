"""The Jobs page's training chart: loss (raw and smoothed) and learning rate per step, read from the run's
metrics.jsonl, smoothed the way TensorBoard smooths, with the command that opens the run's TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sdtune.trainers.core.run_files import read_metrics

DEFAULT_SMOOTHING = 0.6  # TensorBoard's default


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average `s = weight * s + (1 - weight) * value`, divided by
    `1 - weight ** n` after n values so that the start is not pulled toward the 0 the average starts from.

    weight 0 gives the values back; 0.99 averages over about the last hundred."""
    out, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def per_step(records: list[dict]) -> dict[str, list]:
    """Steps with their loss and lr from metrics.jsonl records (events left out); a step a resumed run repeated keeps
    its latest values. Returns {"step": [...], "loss": [...], "lr": [...]} (None where a step logged no value)."""
    latest = {r["step"]: r for r in records if "event" not in r and isinstance(r.get("step"), int)}
    steps = sorted(latest)
    return {"step": steps, "loss": [latest[s].get("loss") for s in steps], "lr": [latest[s].get("lr") for s in steps]}


def training_chart(run_dir: Path, key: str):
    """Loss (raw and smoothed, a slider for the smoothing) and learning rate of a run, and its TensorBoard command."""
    series = per_step(read_metrics(run_dir))
    losses = [(s, v) for s, v in zip(series["step"], series["loss"]) if v is not None]
    weight = st.slider(
        "Loss smoothing",
        0.0,
        0.99,
        DEFAULT_SMOOTHING,
        0.01,
        key=f"{key}-smoothing",
        help="TensorBoard's smoothing: an exponential moving average, 0 = the raw loss of each step.",
    )
    if losses:
        steps, raw = zip(*losses)
        st.line_chart(
            {"step": steps, "loss": raw, "smoothed": smoothed(raw, weight)}, x="step", y=["loss", "smoothed"]
        )
    rates = [(s, v) for s, v in zip(series["step"], series["lr"]) if v is not None]
    if rates:
        steps, lr = zip(*rates)
        st.caption("learning rate")
        st.line_chart({"step": steps, "lr": lr}, x="step", y="lr", height=160)
    if (Path(run_dir) / "logs").is_dir():
        st.caption(f"TensorBoard: `tensorboard --logdir {Path(run_dir) / 'logs'}`, then open http://localhost:6006")
