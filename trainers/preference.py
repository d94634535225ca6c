"""Preference tuning from blind A/B votes: a LoRA trained with the Diffusion-DPO loss over a frozen reference.

Usage:
    sdtune tune-from-votes AB_ID [AB_ID ...] --from toy+toy-purple:0.8 -o runs/liked   # builds the recipe, runs this
    python trainers/preference.py recipes/preference.yaml method.comparisons=[ID] method.reference=toy+toy-purple
    python trainers/preference.py recipe.yaml train.resume=latest                     # continue a stopped run

Diffusion-DPO (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
https://arxiv.org/abs/2311.12908) fine-tunes a diffusion model from (prompt, preferred image, rejected image)
triples against a frozen reference, with no reward model: the loss rewards denoising the winner better, and the
loser worse, than the reference does, and `method.beta` keeps the model near the reference (trainers/core/dpo.py
has the math). Its default, 5000, is the authors' SD1.5 setting, in their code's form of the loss (beta/2 times the
error margin), so a value carries over from their launchers; diffusers' DPO example writes the same loss with 2500,
half the pull. The toy proof (README, "Let your votes decide") runs with 5000 too. Here the triples are the user's
own votes: every voted pair of the A/B comparisons `method.comparisons` (ties and unvoted pairs left out and
counted), rendered with the prompts and seeds stored there.

The reference is `method.reference`, a SPEC as `sdtune ab` takes it: the base with its adapters merged in at their
weights, frozen. What trains is a new LoRA on top of it, not the reference's LoRA continued: a SPEC may hold no
adapter, or several at chosen weights, and only a new LoRA over the merged reference works for every one of them;
it is exactly the change the votes ask for, so it can be dialled (`+liked:0.5`), A/B-tested against the reference,
or dropped, and its parents stay untouched. Use it as the reference plus it: `toy+toy-purple:0.8+liked`.

What happens, in order:
    1. the recipe is checked; the votes become triples (too few, images gone, a reference on another base: one line
       each, before any model loads); the winners and losers are written as two folders under output.dir/votes;
    2. the base loads frozen and the reference's adapters are merged into it; latents and prompts are cached;
    3. a LoRA (fp32) goes into the UNet; the implicit reward accuracy on the pairs is measured for the reference;
    4. the loop: each pair noised with one noise at one timestep, the model's and the reference's (LoRA off) errors
       on winner and loser, the DPO loss, a step;
    5. the LoRA is written in both formats and export-checked over the reference; `adapter.json` gets a `preference`
       section (pairs used, ties, skips, winner share, reward accuracy before and after) and the lineage (parents,
       comparisons, votes, beta); the registry entry carries it.
Ctrl-C saves a checkpoint and stops; `train.resume=latest` continues it, bit-identical to an unbroken run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from accelerate.utils import set_seed

from sdtune.adapters import ab
from sdtune.adapters.ab.votes import VoteSet, check_same_base, collect_votes, spec_base, write_pairs
from sdtune.adapters.export_check import ExportChecker
from sdtune.trainers.core.batches import idle_during_steps, make_batches
from sdtune.trainers.core.cache import text_states
from sdtune.trainers.core.checkpointing import start_or_resume
from sdtune.trainers.core.data import scan_dataset
from sdtune.trainers.core.dpo import PairedBatches, RewardAccuracy, dpo_step_loss, merge_reference
from sdtune.trainers.core.estimate import preflight
from sdtune.trainers.core.export import LoraWriter
from sdtune.trainers.core.loop import RunLoop
from sdtune.trainers.core.lora_layers import add_lora
from sdtune.trainers.core.outputs import RunOutputs, check_settings
from sdtune.trainers.core.recipe import Recipe, RecipeError
from sdtune.trainers.core.runtime import (
    load_frozen_base,
    make_accelerator,
    parse_args,
    prepare_optimization,
    run_cli,
    start_run,
    tracker_config,
    unet_and_text_encoder,
)
from sdtune.trainers.core.validation import Validator, adapters_disabled


def check_recipe(recipe: Recipe) -> None:
    """What DPO does not combine with, refused by name: its loss is the plain per-sample MSE of both images, and
    the prompt is the vote's (no caption dropout, no masks)."""
    train, data = recipe.train, recipe.data
    if train.loss_type != "l2" or train.snr_gamma is not None or train.debiased_estimation_loss:
        raise RecipeError("train.loss_type/snr_gamma/debiased_estimation_loss: the DPO loss compares plain MSEs; "
                          "leave them at l2 / null / false")  # fmt: skip
    if data.caption_dropout_rate or data.masked_loss:
        raise RecipeError(
            "data.caption_dropout_rate/masked_loss: each pair trains on its own prompt, whole; set 0/false"
        )
    base = recipe.base.pretrained_model_name_or_path
    if spec_base(recipe.method.reference, "method.reference") != base:
        raise RecipeError(f"method.reference: {recipe.method.reference} is on another base than base "
                          f"{base!r}; write {base}+ADAPTER...")  # fmt: skip


def votes_for(recipe: Recipe, fresh: bool) -> tuple[VoteSet, object, object]:
    """The votes as triples, written as output.dir/votes/{winners,losers} and scanned as training data."""
    method = recipe.method
    votes = collect_votes(method.comparisons, min_pairs=method.min_pairs)
    check_same_base(votes, method.reference)
    folder = Path(recipe.output.dir) / "votes"
    if fresh:  # a new run's pairs only (a resumed run writes the same ones again)
        shutil.rmtree(folder, ignore_errors=True)
    winners, losers = write_pairs(votes, folder)
    scans = [scan_dataset(recipe.data.model_copy(update={"train_data_dir": str(d)})) for d in (winners, losers)]
    return votes, *scans


def lineage(recipe: Recipe, votes: VoteSet, before: dict, after: dict) -> dict:
    """The manifest's `preference` section and `origin` (the registry's lineage)."""
    method, summary = recipe.method, votes.summary()
    parents = [use.ref for use in ab.parse_spec(method.reference, "method.reference").pipeline.adapters]
    counts = {k: summary[k] for k in ("pairs", "decisive", "a", "b", "ties", "skipped")}
    preference = {"pairs_used": summary["decisive"], "ties": summary["ties"], "skipped": summary["skipped"],
                  "winner_share_a": summary["winner_share_a"], "comparisons": summary["comparisons"],
                  "reference": method.reference, "beta": method.beta,
                  "reward_accuracy": {"before": before, "after": after}}  # fmt: skip
    origin = {"kind": "preference", "parents": parents, "reference": method.reference,
              "comparisons": list(votes.counts), "votes": counts, "beta": method.beta}  # fmt: skip
    return {"preference": preference, "origin": origin}


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)

    # 1) Recipe, votes -> triples (two folders, one name per pair), preflight: everything before a model loads.
    run = start_run(args.recipe, args.overrides, "preference")
    recipe, base = run.recipe, run.base
    method, train, out_dir = recipe.method, recipe.train, Path(recipe.output.dir)
    check_recipe(recipe)
    votes, winners, losers = votes_for(recipe, fresh=run.resume_from is None)
    accelerator = make_accelerator(recipe)
    device = accelerator.device
    accelerator.print(preflight(recipe, winners, device.type, accelerator.num_processes))
    s = votes.summary()
    accelerator.print(f"votes: {s['decisive']} pairs used, {s['ties']} ties and {s['skipped']} unvoted left out")

    # 2) The frozen reference: the base with the reference's adapters merged in (then plain weights, no layers).
    frozen = load_frozen_base(recipe, accelerator)
    pipe, dtype, noise_scheduler = frozen.pipe, frozen.dtype, frozen.noise_scheduler
    unet, text_encoder, tokenizer = frozen.unet, frozen.text_encoder, frozen.tokenizer
    reference = ab.parse_spec(method.reference, "method.reference").pipeline
    accelerator.print(f"reference: {base.name} + {merge_reference(pipe, reference)}")

    # 3) Caches: winners and losers each through the VAE once (ever), the prompts through the text encoder once.
    paired, text_cache = make_batches(
        winners, recipe.data, train, accelerator, frozen.vae, tokenizer, text_encoder, True
    )
    losing, _ = make_batches(losers, recipe.data, train, accelerator, frozen.vae, tokenizer, text_encoder, False)
    batches = PairedBatches(paired, losing)
    accuracy = RewardAccuracy(winners, losers, recipe.data, frozen, accelerator, method.beta)

    # 4) The new LoRA (seeded init; B = 0, so the model starts as the reference), optimizer, schedule, checkpoints.
    set_seed(train.seed)
    lora_configs = add_lora(unet, text_encoder, method)
    opt = prepare_optimization(unet_and_text_encoder(unet, text_encoder, method), recipe, accelerator)
    state = start_or_resume(accelerator, opt.originals, run.resume_from, train.resume, out_dir, opt.extra_state)
    with adapters_disabled(unet):
        before = accuracy()  # the reference's: every margin 0 (accuracy 0.5), and how far it already agrees
    accelerator.print(f"implicit reward accuracy (reference): {before}")

    # 5) What the run writes: the LoRA in both formats, export-checked over the reference (not the bare base);
    # grids and toy scores put the reference ("base") beside reference + LoRA; the preference section at the end.
    validator = Validator(recipe, pipe, accelerator, out_dir, base.name)
    facts = {"beta": method.beta, "reference": method.reference, "comparisons": list(votes.counts)}
    outputs = RunOutputs.for_run(run, winners, accelerator, validator, dtype, facts=facts)
    outputs.checker = reference_checker(recipe, reference, dtype, accelerator)
    outputs.sections = lambda: lineage(recipe, votes, before, accuracy())
    writer = LoraWriter(outputs, unet, text_encoder, lora_configs, opt.trainable)
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune-preference", config=tracker_config(recipe))

    # 6) The loop: a micro-batch is [winners, their losers]; one noise and timestep per pair; model and reference.
    idle = idle_during_steps(recipe.data, text_cache, frozen.vae, text_encoder)
    loop = RunLoop.for_recipe(accelerator, recipe, state, batches, writer.save, validator, idle, opt.outputs_weights)
    for batch in loop.micro_batches():
        with accelerator.accumulate(*opt.models), accelerator.autocast():
            states = text_states(text_cache, tokenizer, text_encoder, batch.captions, device)
            loss, _ = dpo_step_loss(unet, opt.model, noise_scheduler, batch, states, train, dtype, method.beta)
            opt.step(loss, train.max_grad_norm)  # backward, clip, step, schedule (and the EMA, if on)
        loop.after_micro_batch(loss, opt.lr_scheduler.get_last_lr()[0])

    # 7) Final LoRA, export check, grid, scores, the manifest with its preference section, the registry entry.
    return loop.finish(opt.trainable, lambda speed: outputs.finish(writer, state, speed))


def reference_checker(recipe: Recipe, reference, dtype, accelerator) -> ExportChecker:
    """The export check's clean copy: the base with the reference merged in, as the LoRA is used (over it)."""
    from sdtune.adapters.base import load_pipeline

    def load():
        pipe = load_pipeline(recipe.base, torch_dtype=dtype)
        merge_reference(pipe, reference)
        return pipe

    return ExportChecker(load, accelerator.device, check_settings(recipe), accelerator.autocast)


def cli(argv=None) -> int:
    """Entry point: bad input ends in one `error:` line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
