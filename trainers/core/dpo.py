"""Diffusion-DPO's pieces: the loss, the paired step, the paired batches, the frozen reference and the implicit reward
accuracy (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization",
https://arxiv.org/abs/2311.12908).

DPO trains a policy from preference pairs against a frozen reference without a reward model: the reward is implicit,
r(x) = beta * log(p_theta(x) / p_ref(x)). For a diffusion model the log-likelihood is replaced by its evidence lower
bound, i.e. by the denoising error, so with the same noise eps and timestep t for the winner x^w and the loser x^l:

    model_diff = ||eps - eps_theta(x^w_t, t)||^2 - ||eps - eps_theta(x^l_t, t)||^2   (per-sample mean squared error)
    ref_diff   = the same with the frozen reference eps_ref
    inside     = -beta / 2 * (model_diff - ref_diff)
    loss       = -log sigmoid(inside)

The loss falls as the model denoises the winner better than the reference does and the loser worse. `inside` is
the implicit reward margin of the winner over the loser (in the paper's eq. 14, beta*T*omega(lambda_t) with a
constant weight; the 1/2 and this beta are the authors' code, whose SD1.5 launcher sets beta 5000). Its sign over
the training pairs is the implicit reward accuracy: the share of pairs the model ranks as the voter did.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from sdtune.trainers.core.batches import Batch, BatchBuilder
from sdtune.trainers.core.cache import encode_text
from sdtune.trainers.core.diffusion import (
    host_to_device,
    input_perturbation,
    noise_like,
    sample_timesteps,
    training_schedule,
    training_target,
)
from sdtune.trainers.core.val_loss import TIMESTEPS, held_out_latents
from sdtune.trainers.core.validation import adapters_disabled


def dpo_loss(model_losses: torch.Tensor, ref_losses: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean DPO loss, the per-pair `inside` margins) from per-sample denoising errors [2b]: the first b of
    the winners, the last b of their losers, in the same order, the model's and the reference's."""
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside).mean(), inside


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean(dim=list(range(1, pred.ndim)))


def predictions(unet, model, noisy, timesteps, states) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's prediction, the reference's): `model` is `unet` as the loop calls it (prepared); the reference
    is the same UNet with its LoRA switched off, under no_grad (it never trains)."""
    pred = model(noisy, timesteps, states, return_dict=False)[0]
    with torch.no_grad(), adapters_disabled(unet):
        ref = unet(noisy, timesteps, states, return_dict=False)[0]
    return pred, ref


def dpo_step_loss(unet, model, scheduler, batch: Batch, states: torch.Tensor, train, dtype, beta: float):
    """One micro-batch's DPO loss: winners then losers in `batch` (`PairedBatches`), each pair noised with the same
    noise at the same timestep (the paper's estimator: the pair's difference then measures the images, not the
    draws). Draws, from the batch's generator: the noise, the timesteps, the input perturbation (when on).
    Returns (loss, inside margins)."""
    scheduler = training_schedule(scheduler, train.zero_terminal_snr)
    latents = host_to_device(batch.latents, states.device).to(dtype)
    half = latents.shape[0] // 2
    noise = noise_like(
        latents[:half], train.noise_offset, batch.generator, train.multires_noise_iterations,
        train.multires_noise_discount,
    ).repeat(2, 1, 1, 1)  # fmt: skip
    sampled = sample_timesteps(
        half, scheduler, latents.device, batch.generator, train.timestep_sampling, train.min_timestep,
        train.max_timestep,
    )  # fmt: skip
    timesteps = sampled.repeat(2)
    model_input = input_perturbation(
        noise, train.ip_noise_gamma, train.ip_noise_gamma_random_strength, batch.generator
    )
    noisy = scheduler.add_noise(latents, model_input, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    pred, ref = predictions(unet, model, noisy, timesteps, states.to(dtype))
    return dpo_loss(per_sample_mse(pred, target), per_sample_mse(ref, target), beta)


class PairedBatches:
    """Winner and loser batches at the same positions: both folders hold one image per triple under the same name,
    so they scan into the same order and buckets, and each micro-batch is [winners..., their losers...] with one
    caption each (the pair's prompt). Flips come from (seed, epoch, position): a pair is flipped together."""

    def __init__(self, winners: BatchBuilder, losers: BatchBuilder):
        self.winners, self.losers = winners, losers

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return self.winners.epoch_batches(epoch)

    def possible_captions(self) -> set[str] | None:
        return self.winners.possible_captions()

    def build(self, positions: list[int], epoch: int, batch_index: int) -> Batch:
        winners = self.winners.build(positions, epoch, batch_index)
        losers = self.losers.build(positions, epoch, batch_index)
        latents = torch.cat([winners.latents, losers.latents])
        return Batch(latents, winners.captions + losers.captions, winners.generator)


def merge_reference(pipe, spec, registry=None) -> str:
    """Merges the adapters of the reference `spec` (a `compose.PipelineSpec`) into `pipe`'s base weights at their
    weights and drops their layers: the reference is then a plain model, frozen, that the new LoRA sits on. Returns
    what was merged, for the log."""
    from sdtune.adapters.compose import Composer

    if not spec.adapters:
        return "the base alone"
    composer = Composer(pipe, registry).set(spec.adapters).fuse()
    label = composer.lora_label()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers (as `sdtune bake` does)
    return label


def pair_noise(winner_hash: str, loser_hash: str, k: int, shape) -> torch.Tensor:
    """A pair's fixed noise at its k-th timestep, from its own generator (the training RNG untouched)."""
    seed = int(hashlib.sha256(f"dpo|{winner_hash}|{loser_hash}|{k}".encode()).hexdigest()[:15], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


class RewardAccuracy:
    """The implicit reward accuracy on the training pairs: the share whose DPO margin `inside` is positive (a
    margin of exactly 0, a model equal to the reference, counts half), with every pair noised at `TIMESTEPS` fixed
    timesteps with fixed noise, so two measurements differ only by the weights. Also the reference's own agreement
    with the votes: the share of pairs it already denoises better on the winner."""

    def __init__(self, winners, losers, data, frozen, accelerator, beta: float, chunk: int = 8):
        self.unet, self.dtype, self.device = frozen.unet, frozen.dtype, accelerator.device
        self.beta, self.chunk = beta, chunk
        scheduler = training_schedule(frozen.noise_scheduler)
        total = scheduler.config.num_train_timesteps
        means = [held_out_latents(scan, data, frozen.vae) for scan in (winners, losers)]
        with torch.no_grad():
            prompts = [r.caption for r in winners.records]
            self.states = torch.cat([
                encode_text(frozen.tokenizer, frozen.text_encoder, prompts[i : i + chunk], self.device).cpu()
                for i in range(0, len(prompts), chunk)
            ])  # fmt: skip
        self.items = []  # (noisy [2, 4, h, w], target [2, ...], t) per pair and timestep: winner first
        for i, (win, lose) in enumerate(zip(*means)):
            both = torch.stack([win, lose])
            for k in range(TIMESTEPS):
                t = torch.tensor([int((k + 0.5) * total / TIMESTEPS)] * 2)
                noise = pair_noise(winners.records[i].content_hash, losers.records[i].content_hash, k, win.shape)
                noise = noise.expand(2, *win.shape)
                self.items.append(
                    (i, scheduler.add_noise(both, noise, t), training_target(scheduler, both, noise, t), t)
                )

    @torch.no_grad()
    def __call__(self) -> dict:
        modes = [(m, m.training) for m in self.unet.modules()]
        for module, _ in modes:
            module.training = False
        try:
            margins, agreement = self._margins()
        finally:
            for module, mode in modes:
                module.training = mode
        pairs = len(margins)
        wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
        return {"accuracy": round(wins / pairs, 4), "reference_agreement": round(sum(agreement) / pairs, 4),
                "mean_margin": round(sum(margins) / pairs, 4)}  # fmt: skip

    def _margins(self) -> tuple[list[float], list[bool]]:
        """Per pair: the margin averaged over its timesteps; whether the reference's error is lower on the winner."""
        inside, ref_diff = {}, {}
        for start in range(0, len(self.items), self.chunk):
            part = self.items[start : start + self.chunk]
            noisy = torch.cat([p[1] for p in part]).to(self.device, self.dtype)
            target = torch.cat([p[2] for p in part]).to(self.device)
            t = torch.cat([p[3] for p in part]).to(self.device)
            states = torch.cat([self.states[p[0]].expand(2, *self.states.shape[1:]) for p in part])
            pred, ref = predictions(self.unet, self.unet, noisy, t, states.to(self.device, self.dtype))
            model_losses, ref_losses = per_sample_mse(pred, target), per_sample_mse(ref, target)
            # `dpo_loss` wants winners then losers; the items are interleaved (w, l, w, l...)
            order = torch.cat([torch.arange(0, len(part) * 2, 2), torch.arange(1, len(part) * 2, 2)])
            _, margin = dpo_loss(model_losses[order].cpu(), ref_losses[order].cpu(), self.beta)
            for (pair, *_), m, r_w, r_l in zip(part, margin, ref_losses[0::2].cpu(), ref_losses[1::2].cpu()):
                inside.setdefault(pair, []).append(float(m))
                ref_diff.setdefault(pair, []).append(float(r_w - r_l))
        margins = [sum(v) / len(v) for _, v in sorted(inside.items())]
        agreement = [sum(v) / len(v) < 0 for _, v in sorted(ref_diff.items())]
        return margins, agreement
