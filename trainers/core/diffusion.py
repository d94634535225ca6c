"""The diffusion training objective shared by every trainer: noise the latents, predict, weight the loss.

For a clean latent x0, noise eps ~ N(0, I) and a timestep t, the forward process gives
    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.
The UNet sees x_t and predicts either eps ("epsilon") or v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0
("v_prediction"), whichever the base scheduler was trained for; the loss is the MSE to that target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def noise_like(
    latents: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise for `latents`, plus an optional per-channel constant ("noise offset").

    SD's schedule never fully destroys the mean of a latent, so a model trained on plain noise struggles to make
    images much darker or brighter than average. Adding `noise_offset * N(0, 1)` per sample and channel teaches it
    to move that mean (https://www.crosslabs.org/blog/diffusion-with-offset-noise).

    The step's generator lives on the CPU (the same draws on every machine, see `step_seed`; a CPU generator
    cannot draw on CUDA): the noise is drawn there and copied over.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, dtype=latents.dtype)
    return host_to_device(noise, latents.device)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait. A plain `.to("cuda")` from pageable memory
    synchronizes the stream (the host waits for every queued kernel, and the GPU then idles while the next ones are
    launched); from pinned memory the copy is queued like a kernel."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def sample_timesteps(
    batch_size: int,
    scheduler: DDPMScheduler,
    device: torch.device,
    generator: torch.Generator | None = None,
    sampling: str = "uniform",
) -> torch.Tensor:
    """Integer timesteps in [0, num_train_timesteps): uniform, or "cubic", t = (1 - u^3) T with u uniform in [0, 1).

    Cubic puts most steps at high noise (P(t > T/2) ~ 0.79), where an image's layout is decided: what a
    structure-following adapter (ControlNet, T2I-Adapter) has to learn, and where epsilon-prediction's loss says
    little about it. diffusers' SDXL T2I-Adapter example trains this way.
    """
    high = scheduler.config.num_train_timesteps
    if sampling == "cubic":
        u = torch.rand((batch_size,), generator=generator, device="cpu")
        return host_to_device(((1 - u**3) * high).long().clamp(0, high - 1), device)
    return host_to_device(torch.randint(0, high, (batch_size,), generator=generator, device="cpu"), device)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet must predict, by the base scheduler's `prediction_type`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"base scheduler has prediction_type={prediction_type!r}; sdtune trains epsilon or v_prediction")


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """MSE between prediction and target, optionally re-weighted per sample by min-SNR-gamma.

    Min-SNR (Hang et al. 2023, https://arxiv.org/abs/2303.09556) caps the weight of low-noise timesteps, whose
    easy, high-SNR losses otherwise dominate the gradient: weight = min(SNR, gamma) / SNR for epsilon targets, and
    min(SNR, gamma) / (SNR + 1) for v targets (whose loss already carries an extra SNR + 1 factor).
    `per_sample` returns the [b] losses instead of their mean (DreamBooth weighs instance and class images apart).
    """
    model_pred, target = model_pred.float(), target.float()
    if snr_gamma is None and not per_sample:
        return F.mse_loss(model_pred, target, reduction="mean")
    losses = F.mse_loss(model_pred, target, reduction="none").mean(dim=list(range(1, model_pred.ndim)))
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=snr_gamma)
        if scheduler.config.prediction_type == "v_prediction":
            losses = losses * clipped / (snr + 1)
        else:
            losses = losses * clipped / snr
    return losses if per_sample else losses.mean()


def prior_preservation_loss(per_sample: torch.Tensor, num_prior: int, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2023, eq. 2): the instance images' mean loss plus `prior_loss_weight`
    times the class images' mean loss. The class images are the last `num_prior` of the batch."""
    num_instance = per_sample.shape[0] - num_prior
    loss = per_sample[:num_instance].mean()
    if num_prior:
        loss = loss + prior_loss_weight * per_sample[num_instance:].mean()
    return loss


def batch_loss(
    model, scheduler: DDPMScheduler, batch, states: torch.Tensor, train, dtype: torch.dtype, per_sample: bool = False
):
    """`denoising_step_loss` of one training `Batch` with the recipe's noise offset and min-SNR settings, its
    latents in the run's dtype on the device of the text states, its noise drawn from the batch's generator."""
    return denoising_step_loss(
        model,
        scheduler,
        host_to_device(batch.latents, states.device).to(dtype),
        states.to(dtype),
        noise_offset=train.noise_offset,
        snr_gamma=train.snr_gamma,
        generator=batch.generator,
        timestep_sampling=train.timestep_sampling,
        per_sample=per_sample,
    )


def denoising_step_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
    timestep_sampling: str = "uniform",
    per_sample: bool = False,
    **unet_kwargs,
) -> torch.Tensor:
    """One training step's loss: draw noise and timesteps, noise the latents, predict, compare.

    `unet_kwargs` reach the UNet call as they are (e.g. ControlNet residuals); `per_sample` keeps the [b] losses.
    """
    noise = noise_like(latents, noise_offset, generator)
    timesteps = sample_timesteps(latents.shape[0], scheduler, latents.device, generator, timestep_sampling)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
    target = training_target(scheduler, latents, noise, timesteps)
    return diffusion_loss(model_pred, target, timesteps, scheduler, snr_gamma, per_sample)
