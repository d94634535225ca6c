"""Jobs page: the queue (studio/jobs.py, SQLite) and one job's live view: progress with ETA, loss chart, latest
validation grid, log tail; cancel, resume, retry, sample now, save now. Everything is read from the database and
the run folder, so a browser refresh or a studio restart loses nothing."""

from __future__ import annotations

import datetime

import streamlit as st

from sdtune.studio import jobs
from sdtune.studio.views.charts import training_chart
from sdtune.studio.views.common import flash, show_flash, shown_errors

REFRESH_SECONDS = 2.0


def render():
    st.title("Jobs")
    show_flash()
    _page()


@st.fragment(run_every=REFRESH_SECONDS)
def _page():
    """The whole view re-reads the queue every few seconds while the page is open (only this part reruns)."""
    jobs.settle_abandoned()  # a dead worker's jobs become interrupted once their trainers have stopped
    listing = jobs.list_jobs()
    known = jobs.workers(include_gone=True)
    if not any(w["alive"] for w in known):
        st.warning("No worker runs this queue: start one with `sdtune worker` (or `sdtune studio --worker`).")
    for gone in (w for w in known if not w["alive"]):
        st.error(
            f"Worker {gone['id']} is gone (last heartbeat {gone['seen_seconds_ago']:.0f} s ago). Its trainers stop "
            "at their next step with a checkpoint, and their jobs become interrupted: Resume continues them."
        )
    if not listing:
        st.info("No jobs yet: launch one on the Train page or with `sdtune jobs submit recipe.yaml`.")
        return
    ids = [job.id for job in listing]
    if st.session_state.get("jobs-selected") not in ids:
        st.session_state["jobs-selected"] = ids[0]
    st.selectbox(
        "Job",
        ids,
        key="jobs-selected",
        format_func=lambda i: next(f"{j.id}: {j.name}" for j in listing if j.id == i),  # the state: below, live
    )
    _live(next(job for job in listing if job.id == st.session_state["jobs-selected"]))
    st.subheader("Queue")
    st.dataframe(
        [
            {
                "id": j.id,
                "name": j.name,
                "method": j.method,
                "state": j.state,
                "attempts": j.attempts,
                "created": _when(j.created_at),
                "error": j.error or "",
            }
            for j in listing
        ],  # fmt: skip
        hide_index=True,
    )


def _live(job: jobs.Job):
    """Progress with ETA, actions, loss chart, latest grid and log tail of one job: the job as `listing` read it, so
    the selector, the actions and the queue table show one state (a second read could see the job move on)."""
    job_id = job.id
    progress = jobs.progress(job_id)
    total = progress["total_steps"]
    label = f"{job.state}: step {progress['step']}" + (f" / {total}" if total else "")
    if progress["eta"] is not None:
        label += f", ETA {_duration(progress['eta'])}"
    # recent pace (grids and checkpoints included) and the last step's own loss: the manifest's figures are the
    # median training step and a moving average, so they differ
    if progress["seconds_per_step"]:
        label += f", {progress['seconds_per_step']:.2f} s/step lately"
    if progress["loss"] is not None:
        label += f", last loss {progress['loss']:.4f}"
    st.progress(1.0 if job.state == "done" else progress["fraction"], text=label)
    if job.error:
        st.error(job.error)
    _actions(job)
    chart, grid = st.columns(2)
    with chart:
        st.caption("loss and learning rate")
        training_chart(job.run_dir, f"job-{job_id}")
    with grid:
        st.caption("latest validation grid")
        if progress["latest_grid"]:
            st.image(progress["latest_grid"], width="stretch")
    if progress["pending_requests"]:
        st.info(f"waiting for the trainer to take: {', '.join(progress['pending_requests'])}")
    st.caption(f"log tail ({job.log})")
    st.code(jobs.log_tail(job_id, 30) or "(no output yet)", language=None)


def _actions(job: jobs.Job):
    buttons = [
        ("Cancel", jobs.cancel, job.state in ("queued", "running", "interrupted") and not job.cancel_requested),
        ("Resume", jobs.resume, job.state in jobs.RESUMABLE),
        ("Retry", jobs.retry, job.state in jobs.FINISHED),
        ("Sample now", jobs.request_sample, job.state == "running"),
        ("Save now", jobs.request_save, job.state == "running"),
    ]
    for column, (label, action, enabled) in zip(st.columns(len(buttons)), buttons):
        if column.button(label, key=f"job-{label}", disabled=not enabled):
            with shown_errors():
                action(job.id)
                flash(f"job {job.id}: {label.lower()} requested")
                st.rerun()


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
