"""Sweeps (issue 25, items 4 and 6): a grid of runs queued as one sweep, run by the worker under a retry policy,
ranked on a leaderboard.

What must hold: the grid is validated at the edge (a bad key or value is one line, nothing queued); the runs get
their own folders and names and one shared cache; the worker retries only transient failures (its worker gone,
CUDA out of memory with half the batch and twice the accumulation, a full disk once freed), never a recipe error;
a sweep whose worker is killed mid-way and restarted finishes every run once, encodes its latents once, and its
leaderboard counts each run once; `show` writes a grid of the best runs and starts a blind A/B of the two best.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from test_jobs import QUICKSTART, SMALL, events, sdtune, start_worker, wait_for
from test_registry import fake_run

from sdtune.adapters.registry import Registry
from sdtune.studio import jobs, leaderboard, retry, sweeps
from sdtune.studio.worker import Running, Worker, WorkerConfig, group_members


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SDTUNE_HOME", str(home))
    monkeypatch.setenv("SDTUNE_CACHE", str(tmp_path / "cache"))  # a cache of this test's own, to count its files
    return home


# -- the grid ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, path, values",
    [
        ("train.learning_rate=1e-4,3e-4", "train.learning_rate", ["1e-4", "3e-4"]),
        ("method.rank=8", "method.rank", ["8"]),
        ("validation.seeds=[0,1],[2,3]", "validation.seeds", ["[0,1]", "[2,3]"]),
        ("output.name='a,b',c", "output.name", ["'a,b'", "c"]),
    ],
)
def test_an_axis_is_a_path_and_its_values(text, path, values):
    assert sweeps.parse_axis(text) == (path, values)


def test_the_grid_is_every_combination_the_first_axis_slowest():
    axes = [("train.learning_rate", ["1e-4", "3e-4"]), ("method.rank", ["8", "16"])]
    assert sweeps.grid(axes) == [
        ["train.learning_rate=1e-4", "method.rank=8"],
        ["train.learning_rate=1e-4", "method.rank=16"],
        ["train.learning_rate=3e-4", "method.rank=8"],
        ["train.learning_rate=3e-4", "method.rank=16"],
    ]


@pytest.mark.parametrize(
    "axes, name, message",
    [
        (["train.lerning_rate=1e-4,3e-4"], None, "train.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        (["train.learning_rate=1e-4,fast"], None, "train.learning_rate: Input should be a valid number"),
        (["method.rank=8,0"], None, "method.rank: Input should be greater than or equal to 1"),
        (["train.learning_rate"], None, "axis 'train.learning_rate': expected section.key=value1,value2"),
        (["method.rank=8,,16"], None, "axis 'method.rank=8,,16': an empty value"),
        (["method.rank=8", "method.rank=16"], None, "axis method.rank: given twice"),
        ([], None, "a sweep needs at least one axis"),
        (["method.rank=8,16"], "my sweep", "--name 'my sweep': letters, digits"),
    ],
)
def test_a_bad_axis_is_one_line_naming_it_and_nothing_is_queued(home, axes, name, message):
    with pytest.raises(sweeps.SweepError, match=re.escape(message)) as caught:
        sweeps.submit_sweep(QUICKSTART, axes, name=name)
    assert "\n" not in str(caught.value)
    assert jobs.list_jobs() == [] and sweeps.list_sweeps() == []


def test_a_sweep_queues_its_grid_with_own_folders_and_names_and_one_cache(home, tmp_path):
    axes = ["train.learning_rate=1e-4,3e-4", "method.rank=8,16", "train.max_train_steps=7"]
    sweep, queued = sweeps.submit_sweep(QUICKSTART, axes, seeds=[0, 1], name="lr-rank")
    assert len(queued) == 8 and {job.sweep_id for job in queued} == {sweep.id}
    assert {job.max_tries for job in queued} == {retry.DEFAULT_MAX_TRIES}
    recipes = [yaml.safe_load(job.recipe.read_text()) for job in queued]
    assert len({r["output"]["dir"] for r in recipes}) == 8 and [r["output"]["name"] for r in recipes] == [
        f"lr-rank-{i}" for i in range(1, 9)
    ]
    assert {r["data"]["cache_dir"] for r in recipes} == {str(tmp_path / "cache")} == {sweep.cache_dir}
    assert [(r["train"]["learning_rate"], r["method"]["rank"], r["train"]["seed"]) for r in recipes[:3]] == [
        (1e-4, 8, 0), (1e-4, 8, 1), (1e-4, 16, 0)
    ]  # fmt: skip
    assert {r["train"]["max_train_steps"] for r in recipes} == {7}  # one value: shared by every run, not an axis
    assert [path for path, _ in sweep.axes] == ["train.learning_rate", "method.rank", "train.seed"]
    assert sweeps.swept_values(sweep, queued[-1]) == {"train.learning_rate": "3e-4", "method.rank": "16",
                                                      "train.seed": "1"}  # fmt: skip
    with pytest.raises(sweeps.SweepError, match="--name lr-rank: a sweep of that name exists"):
        sweeps.submit_sweep(QUICKSTART, ["method.rank=4"], name="lr-rank")
    shown = sdtune("jobs", "sweep", "show", "lr-rank", "--rank-by", "val_loss", home=home)
    assert "sweep lr-rank: 8 runs (8 queued), ranked by val_loss" in shown.stdout, shown.stderr
    refused = sdtune("jobs", "sweep", str(QUICKSTART), "train.learning_rate=1e-4,x", home=home)
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1 and "train.learning_rate" in refused.stderr


# -- the retry policy, without a GPU: the worker reaps a trainer that printed what a failure prints -------------------


@pytest.mark.parametrize(
    "log, code, kind",
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 1, "oom"),
        ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate", 1, "oom"),
        ("OSError: [Errno 28] No space left on device: 'run/checkpoints'", 1, "disk-full"),
        ("error: data.train_data_dir: folder not found", 2, "recipe"),
        ("error: recipe.yaml: train.lr: Input should be a valid number", 1, "recipe"),
        ("Segmentation fault (core dumped)", -11, "other"),
    ],
)
def test_failures_are_classified_by_what_the_attempt_printed(log, code, kind):
    assert retry.classify(f"=== attempt 1\nsteps: 3%\n{log}\n", code) == kind


def test_only_the_latest_attempt_decides(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "\n=== attempt 1 (...)\ntorch.OutOfMemoryError: CUDA out of memory\n\n=== attempt 2 (...)\nerror: x\n"
    )
    assert retry.classify(retry.last_attempt(log), 2) == "recipe"


def fail_once(home: Path, job: jobs.Job, printed: str, code: int = 1) -> jobs.Job:
    """A worker claims `job` and reaps a 'trainer' that printed `printed` and exited with `code`."""
    worker = Worker(WorkerConfig(home=str(home)))
    claimed = worker.claim()
    assert claimed.id == job.id
    claimed.log.parent.mkdir(parents=True, exist_ok=True)
    with claimed.log.open("a") as log:
        log.write(f"\n=== attempt {claimed.attempts}\n")
        log.flush()
        process = subprocess.Popen(["sh", "-c", f"printf '%s\\n' \"$0\"; exit {code}", printed], stdout=log)
    process.wait()
    worker.running[claimed.id] = Running(claimed, process)
    worker.reap()
    return jobs.get(job.id)


def batch_of(job: jobs.Job) -> tuple[int, int]:
    train = yaml.safe_load(job.recipe.read_text())["train"]
    return train["train_batch_size"], train["gradient_accumulation_steps"]


def test_out_of_memory_retries_with_half_the_batch_and_twice_the_accumulation(home):
    _, [job] = sweeps.submit_sweep(QUICKSTART, ["train.train_batch_size=4"], name="oom")
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"
    failed = fail_once(home, job, oom)
    assert (failed.state, failed.failure) == ("failed", "oom") and "[oom: the worker retries it]" in failed.error
    [(requeued, note)] = retry.requeue_due()
    assert (requeued.state, requeued.resume) == ("queued", 0) and batch_of(requeued) == (2, 2)
    assert note == "oom: from scratch with train_batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2"
    assert f"=== retry policy ({time_of(job)}): attempt 1 of 3; {note}" in job.log.read_text()
    fail_once(home, job, oom)
    [(requeued, _)] = retry.requeue_due()
    assert batch_of(requeued) == (1, 4)  # the same 4 images per optimizer step
    last = fail_once(home, job, oom)
    assert last.attempts == 3 and "[not retried: 3 of 3 tries used]" in last.error
    assert retry.requeue_due() == [] and jobs.get(job.id).state == "failed"


def time_of(job: jobs.Job) -> str:
    return re.search(r"=== retry policy \(([^)]*)\)", job.log.read_text()).group(1)


def test_out_of_memory_at_batch_size_1_and_recipe_errors_are_never_retried(home):
    _, [at_one, typo] = sweeps.submit_sweep(QUICKSTART, ["train.train_batch_size=1,2"], name="never")
    fail_once(home, at_one, "torch.OutOfMemoryError: CUDA out of memory.")
    assert retry.requeue_due() == []
    given_up = jobs.get(at_one.id)
    assert given_up.state == "failed" and given_up.error.endswith("[not retried: out of memory at batch size 1]")
    failed = fail_once(home, typo, "error: data.train_data_dir: /nowhere: folder not found", code=2)
    assert failed.failure == "recipe" and failed.error == (
        "error: data.train_data_dir: /nowhere: folder not found [not retried: recipe failures are not transient]"
    )
    assert retry.requeue_due() == [] and jobs.get(typo.id).state == "failed"


def test_a_lone_job_is_never_retried_by_itself(home):
    job = jobs.submit(QUICKSTART, ["train.train_batch_size=4"])
    failed = fail_once(home, job, "torch.OutOfMemoryError: CUDA out of memory.")
    assert failed.failure == "oom" and failed.error == f"exit code 1 (see {job.log})"  # no retry note
    assert retry.requeue_due() == [] and batch_of(jobs.get(job.id)) == (4, 1)


def test_a_full_disk_waits_until_space_is_freed_then_continues(home):
    _, [job] = sweeps.submit_sweep(QUICKSTART, ["method.rank=4"], name="disk")
    failed = fail_once(home, job, "OSError: [Errno 28] No space left on device")
    assert failed.failure == "disk-full"
    assert retry.requeue_due(disk_free=lambda job: False) == [] and jobs.get(job.id).state == "failed"
    [(requeued, note)] = retry.requeue_due(disk_free=lambda job: True)
    assert (requeued.state, requeued.resume) == ("queued", 1) and note.startswith("disk-full: space is free again")


def test_a_run_whose_worker_died_continues_from_its_checkpoint_within_its_tries(home):
    _, [job] = sweeps.submit_sweep(QUICKSTART, ["method.rank=4"], name="gone")
    with jobs.connect() as conn:
        conn.execute("UPDATE jobs SET state = 'interrupted', attempts = 1 WHERE id = ?", (job.id,))
    [(requeued, note)] = retry.requeue_due()
    assert (requeued.state, requeued.resume, requeued.failure) == ("queued", 1, "worker-gone")
    with jobs.connect() as conn:
        conn.execute("UPDATE jobs SET state = 'interrupted', attempts = 3 WHERE id = ?", (job.id,))
    assert retry.requeue_due() == [] and jobs.get(job.id).state == "interrupted"


# -- the leaderboard over finished run folders (as trainers leave them), and its pages ---------------------------------


def finished(job: jobs.Job, both: float | None, by_step: dict[int, float], seconds: float = 0.1) -> None:
    """Marks `job` done with a run folder whose manifest holds these scores, val_loss per step, speed and memory;
    a LoRA file in checkpoint-4 and -8 and the final one (step 12)."""
    from sdtune.adapters.lora_files import PEFT_FILE

    fake_run(job.run_dir, name=job.name)
    manifest = json.loads((job.run_dir / "adapter.json").read_text())
    manifest["training"] = {"steps": 12, "seconds_per_step": seconds, "peak_memory_bytes": 3 << 20,
                            "val_loss": {"by_step": {str(k): v for k, v in by_step.items()}}}  # fmt: skip
    manifest["scores"] = None if both is None else {"adapter": {"color": 1.0, "shape": both, "both": both}}
    manifest["recipe"] = {"validation": {"prompts": ["a purple circle"], "seeds": [0]}}
    (job.run_dir / "adapter.json").write_text(json.dumps(manifest))
    for step in (4, 8):
        (job.run_dir / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True, exist_ok=True)
        (job.run_dir / "checkpoints" / f"checkpoint-{step}" / PEFT_FILE).write_bytes(b"peft")
    with jobs.connect() as conn:
        conn.execute("UPDATE jobs SET state = 'done', attempts = 1 WHERE id = ?", (job.id,))


@pytest.fixture
def ranked_sweep(home) -> list[jobs.Job]:
    """Four runs: two finished with val_loss, one finished without it (and no scores), one still queued."""
    _, queued = sweeps.submit_sweep(QUICKSTART, ["method.rank=4,8", "train.learning_rate=1e-4,3e-4"], name="board")
    finished(queued[0], 0.50, {4: 0.30, 8: 0.20, 12: 0.25}, seconds=0.2)
    finished(queued[1], 0.75, {4: 0.10, 8: 0.10, 12: 0.40})  # a tie: the earlier checkpoint wins
    finished(queued[2], None, {}, seconds=0.3)
    return queued


def test_a_finished_run_whose_folder_is_gone_or_broken_says_so_and_the_board_still_shows(ranked_sweep):
    from streamlit.testing.v1 import AppTest

    (ranked_sweep[0].run_dir / "adapter.json").write_text('{"name": "board-')  # cut off mid-write
    shutil.rmtree(ranked_sweep[1].run_dir)
    board = leaderboard.leaderboard("board", "score")
    problems = {row["job"]: row["problem"] for row in board["rows"]}
    assert "adapter.json: not valid JSON" in problems[ranked_sweep[0].id]
    assert problems[ranked_sweep[1].id].endswith("no such file") and problems[ranked_sweep[2].id] is None
    text = leaderboard.table_text(board)
    assert f"job {ranked_sweep[1].id}: not measured: {ranked_sweep[1].run_dir}: no such file" in text
    at = AppTest.from_string("from sdtune.studio.views import sweeps\nsweeps.render()\n", default_timeout=600).run()
    assert not at.exception
    shown = list(at.dataframe[0].value["not measured because"])
    assert sum(isinstance(reason, str) and "no such file" in reason for reason in shown) == 1
    assert [w.value for w in at.warning][
        1
    ] == f"job {ranked_sweep[1].id}: not measured: {ranked_sweep[1].run_dir}: no such file"


@pytest.mark.parametrize(
    "rank_by, order, best",
    [
        ("score", [2, 1, 3, 4], ["checkpoint-4", "checkpoint-8", "final", None]),
        ("val_loss", [2, 1, 3, 4], ["checkpoint-4", "checkpoint-8", "final", None]),
        ("step_time", [2, 1, 3, 4], ["checkpoint-4", "checkpoint-8", "final", None]),
    ],
)
def test_the_leaderboard_ranks_finished_runs_once_each_and_lists_the_rest_after(ranked_sweep, rank_by, order, best):
    board = leaderboard.leaderboard("board", rank_by)
    ids = [job.id for job in ranked_sweep]
    assert [row["job"] for row in board["rows"]] == [ids[i - 1] for i in order]
    assert [row["best_checkpoint"] for row in board["rows"]] == best
    assert board["counts"] == {"done": 3, "queued": 1}
    first = board["rows"][0]
    assert (first["val_loss"], first["best_step"], first["score"]) == (0.10, 4, 0.75)
    assert first["values"] == {"method.rank": "4", "train.learning_rate": "3e-4"}
    assert [row["rank"] for row in board["rows"]][-1] is None  # the queued run: listed, not ranked
    text = leaderboard.table_text(board)
    assert text.splitlines()[0] == f"sweep board: 4 runs (3 done, 1 queued), ranked by {rank_by}"
    assert "checkpoint-4@4" in text and "3 MiB" in text


def test_a_bad_metric_or_count_is_refused_in_one_line(home, ranked_sweep):
    with pytest.raises(sweeps.SweepError, match="--rank-by loss: rank by one of score, color, shape, val_loss"):
        leaderboard.leaderboard("board", "loss")
    with pytest.raises(sweeps.SweepError, match="sweep 'nope': no such sweep"):
        leaderboard.leaderboard("nope")
    board = leaderboard.leaderboard("board", "score")
    with pytest.raises(sweeps.SweepError, match="2 finished run.s. ranked by score, 3 needed"):
        leaderboard.top_grid(board, 3)
    refused = sdtune("jobs", "sweep", "show", "board", "--ab-top", "3", home=home)
    assert refused.returncode != 0 and refused.stderr == (
        "sdtune jobs: --ab-top 3: a blind A/B compares two runs; give --ab-top 2\n"
    )
    assert "sweep board: 4 runs" in refused.stdout  # the leaderboard was printed first


def test_the_sweeps_page_shows_the_leaderboard_ranked_by_the_chosen_metric(ranked_sweep):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_string("from sdtune.studio.views import sweeps\nsweeps.render()\n", default_timeout=600).run()
    assert not at.exception and at.selectbox(key="sweeps-selected").value == "board"
    table = at.dataframe[0].value
    assert list(table["job"]) == [ranked_sweep[i].id for i in (1, 0, 2, 3)]
    assert list(table["best checkpoint"])[:2] == ["checkpoint-4 (step 4)", "checkpoint-8 (step 8)"]
    assert "iou" not in table.columns  # LoRA runs: no column of empty cells for a ControlNet's metric
    at.selectbox(key="sweeps-rank-by").set_value("step_time")
    at = at.run()
    assert list(at.dataframe[0].value["s/step"])[:2] == [0.1, 0.2]


def test_the_train_page_queues_a_sweep_and_refuses_a_bad_axis_in_one_line(home, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the preset's data path is relative to the repository
    at = AppTest.from_string("from sdtune.studio.views import train\ntrain.render()\n", default_timeout=600).run()
    [axes] = [t for t in at.text_area if t.label.startswith("Axes")]
    axes.set_value("train.learning_rate=1e-4,3e-4\nmethod.rnak=4,8")
    at = at.button(key="FormSubmitter:train-sweep-Queue sweep").click().run()
    assert [e.value for e in at.error] == [
        "recipe.yaml: method.rnak: unknown key (did you mean 'rank'?) (in the sweep's run train.learning_rate=1e-4 "
        "method.rnak=4)"
    ]
    assert jobs.list_jobs() == []
    [axes] = [t for t in at.text_area if t.label.startswith("Axes")]
    axes.set_value("train.learning_rate=1e-4,3e-4\nmethod.rank=4,8")
    next(t for t in at.text_input if t.label.startswith("Sweep name")).set_value("from-page")
    at = at.button(key="FormSubmitter:train-sweep-Queue sweep").click().run()
    assert not at.exception and not at.error
    assert any(s.value.startswith("sweep from-page: 4 runs queued") for s in at.success)
    assert len(sweeps.sweep_jobs("from-page")) == 4 and at.session_state["sweeps-selected"] == "from-page"


# -- a real sweep on the toy base: killed, restarted, ranked ----------------------------------------------------------

TINY = [
    *SMALL,
    "train.max_train_steps=12",
    "train.checkpointing_steps=4",
    "validation.loss_split=0.25",
    "validation.toy_score=[{prompt: a purple circle, color: purple, shape: circle}]",
]


def encodings(job: jobs.Job) -> list[int]:
    """The 'N encodings computed' of each of the job's trainer starts, from its log."""
    return [
        int(n) for n in re.findall(r"latents: \d+ images from cache, (\d+) encodings computed", job.log.read_text())
    ]


def test_a_sweep_killed_mid_way_finishes_every_run_once_and_ranks_each_once(home, tmp_path):
    """Issue 25 item 6: SIGKILL the worker during the first run; a restarted worker continues it from its
    checkpoint (the retry policy, no `jobs resume`), then runs the second. Each run trains to its end once, is
    registered once and is one leaderboard row; the latents are encoded once for the whole sweep."""
    sweep, queued = sweeps.submit_sweep(QUICKSTART, ["train.learning_rate=1e-3,3e-4"], fixed=TINY, name="kill")
    worker = start_worker(home, tmp_path / "worker.log")
    first = queued[0]
    wait_for(lambda: jobs.progress(first.id)["step"] >= 2, 300, "the first run's first steps", worker)
    pgid = jobs.get(first.id).pgid
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    wait_for(lambda: not group_members(pgid), 120, "the trainer to stop by itself")
    stopped = events(first.id, home)[-1]
    assert stopped["event"] == "stopped" and stopped["step"] < 12

    worker = start_worker(home, tmp_path / "worker.log", "--once")
    assert worker.wait(timeout=600) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert "queued again by the retry policy (worker-gone" in (tmp_path / "worker.log").read_text()
    done = [jobs.get(job.id) for job in queued]
    assert [(job.state, job.attempts) for job in done] == [("done", 2), ("done", 1)], [j.error for j in done]
    starts = [[(e["resumed"], e["step"]) for e in events(job.id, home) if e["event"] == "start"] for job in done]
    assert starts == [[(False, 0), (True, stopped["step"])], [(False, 0)]]
    assert [[e["event"] for e in events(job.id, home)].count("done") for job in done] == [1, 1]
    assert sorted(entry.name for entry in Registry(home).list()) == ["kill-1", "kill-2"]

    # cached work is shared: 2 runs, 3 trainer starts, and the latents were encoded by the first start alone
    counts = [encodings(job) for job in done]
    files = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    held_out = len(json.loads((done[0].run_dir / "adapter.json").read_text())["training"]["val_loss"]["images"])
    assert counts[0][0] > 0 and counts[0][1:] == [0] and counts[1] == [0], counts
    assert len(files) == counts[0][0] + held_out  # train images (+ flips) and the held-out ones, each once

    board = leaderboard.leaderboard("kill", "val_loss")
    assert [row["job"] for row in board["rows"]] == sorted(
        [job.id for job in done], key=lambda i: next(r["val_loss"] for r in board["rows"] if r["job"] == i)
    )
    assert board["counts"] == {"done": 2} and [row["rank"] for row in board["rows"]] == [1, 2]
    for row in board["rows"]:
        assert row["val_loss"] > 0 and row["step_time"] > 0 and row["peak_memory"] > 0 and row["score"] is not None
        assert row["best_checkpoint"] in ("checkpoint-4", "checkpoint-8", "checkpoint-12", "final")
    text = sdtune("jobs", "sweep", "show", "kill", "--rank-by", "val_loss", home=home)
    assert "sweep kill: 2 runs (2 done), ranked by val_loss" in text.stdout, text.stderr
    assert text.stdout.count(" done ") == 2, text.stdout  # one line per run
    top = leaderboard.top_grid(board, 2, steps=2)
    from PIL import Image

    assert top == home / "sweeps" / "kill" / "top.png" and Image.open(top).size[1] > 2 * 160  # a row per run
    comparison = leaderboard.ab_top(board, 2, steps=2)
    assert comparison["blind"] and len(comparison["pairs"]) == 1  # the runs' validation: one prompt, seed 0
    assert {comparison["a"], comparison["b"]} == {f"toy+{leaderboard._best_lora(row)}" for row in board["rows"]}


def test_a_sweeps_dreambooth_runs_share_one_folder_of_class_images(home, tmp_path):
    """Class images are cached under a key of the base, the class prompt and the sampling settings, in the cache
    every run of the sweep is given: 4 runs (learning rate x seed) generate into, and reuse, one folder."""
    from sdtune.trainers.core.class_images import generated_folder
    from sdtune.trainers.core.recipe import load_recipe

    recipe = QUICKSTART.parent / "toy-dreambooth.yaml"
    _, queued = sweeps.submit_sweep(recipe, ["train.learning_rate=1e-4,3e-4"], seeds=[0, 1], name="db")
    folders = {generated_folder(load_recipe(job.recipe)) for job in queued}
    assert len(queued) == 4 and len(folders) == 1
    assert folders.pop().parent == tmp_path / "cache" / "class_images"


def test_a_controlnet_sweep_is_ranked_by_layout_iou_and_shows_it(home):
    """A ControlNet run's scores carry the layout IoU: `--rank-by iou` ranks by it and the table gets the column;
    a LoRA sweep's table has none (see the ranked_sweep tests)."""
    _, queued = sweeps.submit_sweep(QUICKSTART, ["train.learning_rate=1e-4,3e-4,1e-3"], name="edges")
    for job, iou in zip(queued, (0.55, 0.71, None)):
        finished(job, 0.5, {})
        manifest = json.loads((job.run_dir / "adapter.json").read_text())
        manifest["scores"]["adapter"]["iou"] = iou
        (job.run_dir / "adapter.json").write_text(json.dumps(manifest))
    board = leaderboard.leaderboard("edges", "iou")
    assert [(row["job"], row["rank"], row["iou"]) for row in board["rows"]] == [
        (queued[1].id, 1, 0.71), (queued[0].id, 2, 0.55), (queued[2].id, None, None)]  # fmt: skip
    head, first = leaderboard.table_text(board).splitlines()[1:3]
    assert head.split()[6:9] == ["shape", "iou", "val_loss"] and first.split()[7] == "0.71"


def test_a_sweep_whose_jobs_are_gone_from_the_queue_shows_a_line_not_an_error(ranked_sweep):
    from streamlit.testing.v1 import AppTest

    with jobs.connect() as conn:
        conn.execute("DELETE FROM jobs")  # e.g. a jobs.db copied from another machine, or cleaned by hand
    at = AppTest.from_string("from sdtune.studio.views import sweeps\nsweeps.render()\n", default_timeout=600).run()
    assert not at.exception and not at.dataframe
    assert [i.value for i in at.info] == ["Sweep board has no runs in the job queue."]
    assert [c.value for c in at.caption][0].startswith("0 runs; axes: ")  # not "0 runs ()"
    assert leaderboard.table_text(leaderboard.leaderboard("board", "score")).startswith("sweep board: 0 runs, ranked")
