"""Resumable checkpoints through Accelerate `save_state`, small and crash-safe.

- Only trainable tensors are saved (a LoRA checkpoint is megabytes, not the 3.4 GB UNet): the
  `register_save_state_pre_hook` below swaps each model's full state dict for its `requires_grad` parameters.
  The same hooks serve LoRA (only LoRA weights train), full DreamBooth and ControlNet.
- A checkpoint is written to `.tmp-checkpoint-N` and renamed when complete, so a run killed mid-save leaves the
  previous checkpoint intact and `resume: latest` never picks up a torn one.
- `TrainState` (step, epoch, position in the epoch) is registered with Accelerate, which also saves the optimizer,
  LR scheduler, grad scaler and RNG states. Together with per-step seeding in the trainers, a resumed run ends
  bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdtune.adapters.atomic import replace_folder
from sdtune.adapters.errors import NotFoundError
from sdtune.adapters.run_folder import CHECKPOINT_RE, checkpoints_dir, list_checkpoints  # noqa: F401 - re-exported


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    last_loss: float = float("nan")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, value)


def register_trainable_state_hooks(accelerator, models: list[torch.nn.Module]):
    """Makes `save_state`/`load_state` store only the trainable parameters of `models` (in order)."""

    def save_hook(prepared_models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                model = accelerator.unwrap_model(model)
                trainable = {
                    n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
                }
                save_file(trainable, str(Path(output_dir) / f"trainable_{i}.safetensors"))
        weights.clear()  # nothing else of the models is written

    def load_hook(prepared_models, input_dir):
        for i, model in enumerate(models):
            model = accelerator.unwrap_model(model)
            saved = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            params = dict(model.named_parameters())
            missing = sorted(set(saved) - set(params))
            if missing:
                raise RuntimeError(
                    f"checkpoint {input_dir} holds {len(missing)} tensors this model lacks, "
                    f"e.g. {missing[0]}: it was made with another method or preset"
                )
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor.to(params[name].dtype))
        prepared_models.clear()  # loaded here; Accelerate must not look for full model files

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def start_or_resume(
    accelerator,
    models: list[torch.nn.Module],
    resume_from: Path | None,
    resume: str | None,
    output_dir: str | Path,
    extra_state=(),
) -> TrainState:
    """Registers what a checkpoint holds (the trainable tensors of `models`, optimizer, schedule, RNG, where the loop
    stands, and `extra_state` such as an EMA) and, given a checkpoint, restores it all. Returns the `TrainState`."""
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    for obj in extra_state:
        accelerator.register_for_checkpointing(obj)
    register_trainable_state_hooks(accelerator, models)
    restore_checkpoint(accelerator, resume_from, resume, output_dir, state)
    return state


def save_checkpoint(accelerator, output_dir: str | Path, step: int, keep: int | None) -> Path:
    """Saves the full training state as `checkpoints/checkpoint-<step>`, atomically; keeps the newest `keep`."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder(tmp, final)  # its name is the same in every process (all wrote into it), so not atomic_folder
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainable_0.safetensors").is_file():
        raise NotFoundError(f"train.resume: {resume} is not a checkpoint folder (expected checkpoints/checkpoint-N)")
    return path


# What a run leaves in its output.dir besides the weight files, which a new run replaces anyway (not requests/: a
# "save now" may be asked before the first step).
RUN_ARTIFACTS = ("adapter.json", "metrics.jsonl", "checkpoints", "samples", "logs")


def clear_previous_run(output_dir: str | Path, resume: str | None, overwrite: bool) -> list[str]:
    """Before a fresh start: an earlier run in `output_dir` is refused (its checkpoints would mix with this run's and
    `resume: latest` could pick one of another shape), unless `overwrite`, or `resume` was asked for and found
    nothing in an attempt that never finished (one that died before its first checkpoint restarts clean); then its
    artifacts are removed. Returns the names removed."""
    from sdtune.trainers.core.recipe import RecipeError
    from sdtune.trainers.core.run_files import run_finished

    found = [name for name in RUN_ARTIFACTS if (Path(output_dir) / name).exists()]
    if found and not (overwrite or resume):
        raise RecipeError(
            f"output.dir: {output_dir} already holds a run ({', '.join(found)}); continue it with "
            "train.resume=latest, choose another output.dir, or set output.overwrite=true to replace it"
        )
    if resume and not overwrite and run_finished(output_dir):  # "continue" must not quietly retrain it from step 0
        raise RecipeError(
            f"train.resume={resume}: {output_dir} holds a finished run with no checkpoint to continue from (it saved "
            "none: train.checkpointing_steps above its steps); choose another output.dir, or set "
            "output.overwrite=true to train it again from the start"
        )
    for name in found:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the training loop checks after each step.

    The loop then saves a checkpoint and exits cleanly; a second Ctrl-C aborts at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then stopping "
            "(press Ctrl-C again to abort without saving)",
            flush=True,
        )

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def restore_checkpoint(accelerator, resume_from: Path | None, resume: str | None, output_dir: str | Path, state):
    """Loads `resume_from` into the prepared models, optimizer, scheduler and `state`; says what it did."""
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except Exception as exc:  # torn files, or the checkpoint of another recipe (rank, preset, optimizer)
            from sdtune.trainers.core.recipe import RecipeError

            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RecipeError(
                f"train.resume: {resume_from} cannot be loaded ({detail}): it is damaged or was saved by a recipe "
                "of another shape; resume from an earlier checkpoint-N, or start afresh with output.overwrite=true"
            ) from None
        accelerator.print(f"resumed from {resume_from} at step {state.step} (epoch {state.epoch})")
    elif resume:
        accelerator.print(f"train.resume={resume}: no checkpoint in {checkpoints_dir(output_dir)} yet, starting fresh")
