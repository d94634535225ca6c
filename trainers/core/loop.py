"""The bookkeeping around every trainer's loop: where it stands, when to log, checkpoint, validate and stop.

A trainer writes only what is specific to its method:

    loop = RunLoop(accelerator, recipe.train, state, batches, on_checkpoint=..., on_validation=...)
    for batch in loop.micro_batches():          # resumes mid-epoch, stops at max_train_steps or on Ctrl-C
        with accelerator.accumulate(model), accelerator.autocast():
            loss = ...                            # the method's loss
            accelerator.backward(loss)
            ...                                   # clip, step, zero_grad
        loop.after_micro_batch(loss)              # counts the step, logs, checkpoints, validates, honours Ctrl-C
    if loop.stopped_early:
        return 130

Progress goes to the Accelerate trackers (call `accelerator.init_trackers(...)` on the main process before the
loop): `make_accelerator` always adds the one that writes `metrics.jsonl` in the run folder
(trainers/core/progress.py), which gets every step and the events "start", "checkpoint saved" and "stopped". At
each step boundary the loop also takes the run's
"sample now" / "save now" requests (trainers/core/run_files.py), written by the job worker or the studio.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdtune.adapters.errors import SdtuneError
from sdtune.trainers.core.batches import Batch, BatchBuilder
from sdtune.trainers.core.checkpointing import StopRequest, TrainState, save_checkpoint
from sdtune.trainers.core.progress import ProgressTracker, progress_event
from sdtune.trainers.core.recipe import TrainConfig
from sdtune.trainers.core.run_files import METRICS_FILE, take_requests, worker_gone
from sdtune.trainers.core.runtime import check_replicas_agree, step_seed

LOG_INTERVAL_SECONDS = 2.0  # losses are read from the device and logged at most this often (and at each event)
NONFINITE_STEPS_LIMIT = 10  # this many steps in a row with a NaN/inf loss: the weights are gone, stop
WORKER_GONE = "worker gone"  # the job worker that started this trainer died: stop as on Ctrl-C (run_files.worker_gone)


class TrainingDiverged(SdtuneError, RuntimeError):
    """The loss went NaN/inf: nothing more is saved (the last checkpoint stays the last good one)."""


class RunLoop:
    """Walks epochs and micro-batches from `state` (fresh or resumed) and does the per-step chores."""

    def __init__(
        self,
        accelerator,
        train: TrainConfig,
        state: TrainState,
        batches: BatchBuilder,
        out_dir: str | Path,
        on_checkpoint: Callable[[Path, int], None] | None = None,
        on_validation: Callable[[int], None] | None = None,
        validation_steps: int = 0,
        idle: list[torch.nn.Module] = (),
        outputs_weights: Callable[..., contextlib.AbstractContextManager] | None = None,
        held_out: Callable[[int], float] | None = None,
    ):
        """`idle`: frozen models the step does not call (`idle_during_steps`); they wait in CPU memory while the loop
        steps, and are back on the device for checkpoints, validation and the final outputs. `outputs_weights(
        validation=False)`: the weights saves and grids see (`runtime.Optimization.outputs_weights`: EMA,
        schedule-free), the training weights back after each. `held_out(step)`: the held-out validation loss
        (trainers/core/val_loss.py), measured on the weights a save sees before the first step, at every validation
        and checkpoint step and at the end, and logged as `val_loss`."""
        self.accelerator, self.train, self.state, self.batches = accelerator, train, state, batches
        self.out_dir, self.on_checkpoint, self.on_validation = Path(out_dir), on_checkpoint, on_validation
        self.validation_steps = validation_steps
        self.held_out = held_out
        self.idle = list(idle)
        self.outputs_weights = outputs_weights or (lambda validation=False: contextlib.nullcontext())
        self.stopped_early, self.step_times, self._stop = False, [], None
        self._index = 0
        self._unlogged: list[tuple[int, torch.Tensor, float | None, float]] = []  # (step, loss, lr, wall time)
        self._nonfinite_since: int | None = None  # first step of the current run of NaN/inf losses
        self._logged_at = time.perf_counter()
        self.progress = tqdm(
            total=train.max_train_steps, initial=state.step, desc="steps", disable=not accelerator.is_main_process
        )

    @classmethod
    def for_recipe(
        cls,
        accelerator,
        recipe,
        state: TrainState,
        batches: BatchBuilder,
        on_checkpoint,
        validator,
        idle=(),
        outputs_weights=None,
    ):
        """The loop of a recipe's run: checkpoints in `output.dir` through `on_checkpoint`, and a validation grid
        `samples/step-N.png` every `validation.validation_steps` from `validator`."""
        out_dir = Path(recipe.output.dir)
        held_out = getattr(validator, "loss", None)
        if held_out is not None and state.step:  # resumed: the losses measured before stay in the manifest
            from sdtune.trainers.core.val_loss import recorded_history

            held_out.history.update(recorded_history(out_dir / METRICS_FILE, state.step))
        return cls(
            accelerator,
            recipe.train,
            state,
            batches,
            out_dir,
            on_checkpoint=on_checkpoint,
            on_validation=lambda step: validator.grid(step, out_dir / "samples" / f"step-{step:06d}.png"),
            validation_steps=recipe.validation.validation_steps,
            idle=idle,
            outputs_weights=outputs_weights,
            held_out=held_out,
        )

    @contextlib.contextmanager
    def models_on_device(self):
        """The idle models back on the device for what needs the whole pipeline (checkpoint export checks,
        validation), then parked again."""
        self._park(False)
        try:
            yield
        finally:
            self._park(True)

    def _park(self, parked: bool):
        if self.accelerator.device.type == "cpu":
            return
        for model in self.idle:
            model.to("cpu" if parked else self.accelerator.device)

    @property
    def done(self) -> bool:
        return self.state.step >= self.train.max_train_steps or self.stopped_early

    def micro_batches(self) -> Iterator[Batch]:
        """Yields this process's micro-batches, each with its own seeded generator, until the run is done."""
        with StopRequest() as self._stop:
            progress_event(self.accelerator, "start", self.state.step, resumed=self.state.step > 0)
            if self.state.step == 0:
                self.log_held_out(0)  # the base's held-out loss: where the curve starts
            self._park(True)
            while not self.done:
                epoch_batches = self.batches.epoch_batches(self.state.epoch)
                for index in range(self.state.batches_done_in_epoch, len(epoch_batches)):
                    # Anything that draws from the global RNG (LoRA dropout) is seeded per micro-batch too.
                    torch.manual_seed(
                        step_seed(self.train.seed, self.state.epoch, index, self.accelerator.process_index, 2)
                    )
                    self._index = index
                    yield self.batches.build(epoch_batches[index], self.state.epoch, index)
                    if self.done:
                        break
                else:
                    self.state.epoch += 1
                    self.state.batches_done_in_epoch = 0
        self.progress.close()

    def after_micro_batch(self, loss: torch.Tensor, lr: float | None = None):
        """Call after each micro-batch; acts once per optimizer step (when Accelerate synced the gradients)."""
        self.state.batches_done_in_epoch = self._index + 1  # before any checkpoint: resume starts after it
        if not self.accelerator.sync_gradients:
            return
        state = self.state
        state.step += 1
        now = time.perf_counter()
        self.step_times.append(now)
        # The loss stays on the device until it is logged: reading it (`.item()`) would make the host wait for the
        # GPU every step, and the GPU then idles while the next step is launched.
        self._unlogged.append((state.step, self.accelerator.gather(loss.detach()[None]).mean(), lr, time.time()))
        self.progress.update(1)
        finished = state.step >= self.train.max_train_steps
        asked = self._take_requests()  # "save now" / "sample now"; the final save and grid come anyway
        stop = (self._stop is not None and self._stop.requested) or WORKER_GONE in asked
        checkpoint_due = state.step % self.train.checkpointing_steps == 0 or stop or "save" in asked
        validation_due = self.validation_steps and state.step % self.validation_steps == 0
        if finished or checkpoint_due or validation_due or asked or now - self._logged_at >= LOG_INTERVAL_SECONDS:
            self._log_losses()
            self._refuse_diverged(state.step, saving=finished or checkpoint_due)
        if not finished and (validation_due or checkpoint_due):
            self.log_held_out(state.step)
        if not finished and checkpoint_due:
            with self.models_on_device():
                self._checkpoint(state.step, requested="save" in asked)
        if not finished and (validation_due or "sample" in asked):
            if self.on_validation is not None and self.accelerator.is_main_process:
                with self.models_on_device(), self.outputs_weights(validation=True):
                    self.on_validation(state.step)
        if stop and not finished:
            why = {"reason": "its job worker is gone"} if WORKER_GONE in asked else {}
            because = f" ({why['reason']})" if why else ""
            self.accelerator.print(f"stopped at step {state.step}{because}; resume with: train.resume=latest")
            progress_event(self.accelerator, "stopped", state.step, **why)
            self.stopped_early = True

    def _log_losses(self):
        """Reads the steps' losses from the device in one go and logs each at its own step and time (the
        progress file's pace and ETA stay right); the running loss goes into the state before a checkpoint saves it."""
        if not self._unlogged:
            return
        values = torch.stack([loss for _, loss, _, _ in self._unlogged]).float().tolist()
        state = self.state
        for (step, _, lr, at), step_loss in zip(self._unlogged, values):
            finite = math.isfinite(step_loss)
            self._nonfinite_since = None if finite else (self._nonfinite_since or step)
            if not finite:
                continue  # kept out of the running loss and the logs (a GradScaler run skips such a step)
            state.last_loss = step_loss if math.isnan(state.last_loss) else 0.9 * state.last_loss + 0.1 * step_loss
            logs = {"loss": step_loss, **({"lr": lr} if lr is not None else {})}
            self.accelerator.log(logs, step=step, log_kwargs={ProgressTracker.name: {"at": at}})
        lr = self._unlogged[-1][2]
        self.progress.set_postfix(loss=f"{state.last_loss:.4f}", **({"lr": f"{lr:.2e}"} if lr else {}))
        self._unlogged, self._logged_at = [], time.perf_counter()

    def log_held_out(self, step: int):
        """The held-out validation loss at `step` (main process; none without one), logged to the trackers and
        metrics.jsonl as `val_loss`. It runs on the saved weights (EMA, schedule-free average), draws nothing from
        the training RNG, and puts the training weights back exactly."""
        if self.held_out is None or not self.accelerator.is_main_process:
            return
        with self.models_on_device(), self.outputs_weights():
            value = self.held_out(step)
        self.accelerator.log({"val_loss": value}, step=step)

    def _refuse_diverged(self, step: int, saving: bool):
        """Stops a run whose loss stays NaN/inf, and never saves a checkpoint or adapter made of such steps."""
        since = self._nonfinite_since
        if since is None or not (saving or step - since + 1 >= NONFINITE_STEPS_LIMIT):
            return
        self.progress.close()  # the error goes on a line of its own
        raise TrainingDiverged(
            f"training diverged: the loss is NaN/inf since step {since} (step {step} now), nothing saved from "
            "there on; lower train.learning_rate (or use bf16/fp32) and resume with train.resume=latest"
        )

    def _checkpoint(self, step: int, requested: bool):
        path = save_checkpoint(self.accelerator, self.out_dir, step, self.train.checkpoints_total_limit)
        if self.on_checkpoint is not None and self.accelerator.is_main_process:
            try:
                with self.outputs_weights():  # the checkpoint itself holds the training weights (exact resume)
                    self.on_checkpoint(path, step)  # the writer's save: a failed export check stops the run here
            except BaseException:
                self.progress.close()  # the error goes on a line of its own
                raise
        progress_event(self.accelerator, "checkpoint saved", step, path=path, requested=requested)

    def _take_requests(self) -> set[str]:
        """The main process takes the run folder's requests; under DDP every process must act on the same ones
        (a checkpoint is a collective), so they are broadcast. A dead job worker reads as one more request, "stop":
        the trainer it started must not run on alone (nothing would watch it, and its job would be run again)."""
        asked = set()
        if self.accelerator.is_main_process:
            asked = take_requests(self.out_dir) | ({WORKER_GONE} if worker_gone() else set())
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            asked = broadcast_object_list([asked])[0]
        return asked

    def finish(self, trainable: list[torch.nn.Parameter], write_outputs: Callable[[dict], None]) -> int:
        """After the loop: 130 if Ctrl-C stopped it (a checkpoint holds the run), else 0 once the final outputs are
        written by the main process with this run's speed and memory. Under DDP every process must hold the same
        weights by now (gradients are all-reduced each step): checked, not assumed. A run of several processes ends
        the process here (see `exit_without_teardown`)."""
        if not self.stopped_early:
            self.log_held_out(self.state.step)  # the end's held-out loss, for the manifest's last entry
        self._park(False)  # the final outputs render with the whole pipeline
        code = self._finish(trainable, write_outputs)
        if self.accelerator.num_processes > 1:
            exit_without_teardown(code)
        return code

    def _finish(self, trainable: list[torch.nn.Parameter], write_outputs: Callable[[dict], None]) -> int:
        if self.stopped_early:
            self.accelerator.end_training()
            return 130
        self.accelerator.wait_for_everyone()
        check_replicas_agree(self.accelerator, trainable)
        if self.accelerator.is_main_process:
            with self.outputs_weights():  # what is saved, shown and scored: the EMA / schedule-free average
                write_outputs(self.speed_and_memory())
        self.accelerator.end_training()
        return 0

    def speed_and_memory(self) -> dict:
        """Median seconds per optimizer step (the first 3 are warm-up) and the run's peak memory."""
        import resource

        intervals = [b - a for a, b in zip(self.step_times, self.step_times[1:])][3:]
        cuda = self.accelerator.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "seconds_per_step": round(statistics.median(intervals), 4) if intervals else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda_allocated" if cuda else "rss",
        }


def exit_without_teardown(code: int):
    """Ends a process of a multi-process run once its outputs are written and its process group destroyed.
    Returning would free DDP's reducer, whose gloo process group joins its worker threads while holding the GIL; a
    worker still releasing a gathered tensor waits for the GIL, and both wait forever (pytorch/pytorch#190489: seen
    here as a CPU DDP run that never exits, now and then, on a loaded machine)."""
    import logging
    import os
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
