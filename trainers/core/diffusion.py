"""The diffusion training objective shared by every trainer: noise the latents, predict, weight the loss.

For a clean latent x0, noise eps ~ N(0, I) and a timestep t, the forward process gives
    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.
The UNet sees x_t and predicts either eps ("epsilon") or v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0
("v_prediction"), whichever the base scheduler was trained for; the loss is the MSE to that target.

Every recipe key that changes this step acts here, in `denoising_step_loss`, so LoRA, DreamBooth and ControlNet
all get it: the noise (`noise_offset`, `multires_noise_*`, `ip_noise_gamma`), the timesteps (`timestep_sampling`,
`min_timestep`, `max_timestep`), the schedule (`zero_terminal_snr`), the loss (`loss_type`, `huber_*`) and the
weight of each timestep (`snr_gamma`, `debiased_estimation_loss`), and of each latent pixel (`data.masked_loss`,
which reaches it as the batch's masks). Their defaults give the plain step above. Every
random draw comes from the step's CPU generator, in a fixed order, and an option that is off draws nothing: a
resumed run draws what the unbroken run drew, and a recipe without the new keys trains as it did before them.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdtune.trainers.core.recipe import RecipeError, TrainConfig

PLAIN_STEP = TrainConfig()  # the step with no options on: DDPM noise, uniform timesteps, the MSE
DEBIASED_SNR_CAP = 1000.0  # sd-scripts caps the SNR at 1000 for debiased estimation (SD's SNR at t = 0 is ~1175)


def noise_like(
    latents: torch.Tensor,
    noise_offset: float = 0.0,
    generator: torch.Generator | None = None,
    multires_iterations: int = 0,
    multires_discount: float = 0.3,
) -> torch.Tensor:
    """Gaussian noise for `latents`, plus an optional per-channel constant ("noise offset") and pyramid noise.

    SD's schedule never fully destroys the mean of a latent, so a model trained on plain noise struggles to make
    images much darker or brighter than average. Adding `noise_offset * N(0, 1)` per sample and channel teaches it
    to move that mean (https://www.crosslabs.org/blog/diffusion-with-offset-noise). `multires_iterations` adds
    low-frequency noise the same way, at every scale (`pyramid_noise`).

    The step's generator lives on the CPU (the same draws on every machine, see `step_seed`; a CPU generator
    cannot draw on CUDA): the noise is drawn there and copied over.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, dtype=latents.dtype)
    if multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount, generator)
    return host_to_device(noise, latents.device)


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, as sd-scripts' `multires_noise_iterations` (J. Whitaker 2023,
    https://wandb.ai/johnowhitaker/multires_noise/reports/Multi-Resolution-Noise-for-Diffusion-Model-Training--VmlldzozNjYyOTU2).

    Level i is fresh Gaussian noise at 1/r^i of the latent's size, with r uniform in [2, 4) (not always 2, so the
    levels do not align), upsampled bilinearly and weighted discount^i:
        n = eps + sum_i discount^i * up(N(0, I) at (h, w) / r^i),   then n / std(n).
    Level 0 is full size; the levels stop at 1 pixel. Like offset noise it puts energy in the low frequencies that
    the schedule otherwise barely destroys. The division by the batch's std brings it back to about unit variance.
    Drawn on the CPU in fp32 from `generator` (r included), returned in `noise`'s dtype.
    """
    b, c, h, w = noise.shape
    pyramid = noise.float()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        size = (max(1, int(h / r**i)), max(1, int(w / r**i)))
        level = torch.randn((b, c, *size), generator=generator)
        pyramid = pyramid + F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
        if 1 in size:
            break
    return (pyramid / pyramid.std()).to(noise.dtype)


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
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> torch.Tensor:
    """Integer timesteps in [min_timestep, max_timestep) (default [0, num_train_timesteps)): uniform, or "cubic",
    t = min + (1 - u^3) (max - min) with u uniform in [0, 1).

    Cubic puts most steps at high noise (P(t > T/2) ~ 0.79 over the whole range), where an image's layout is
    decided: what a structure-following adapter (ControlNet, T2I-Adapter) has to learn, and where
    epsilon-prediction's loss says little about it. diffusers' SDXL T2I-Adapter example trains this way. A range
    (sd-scripts' `min_timestep` / `max_timestep`) trains only the noise levels it holds, e.g. [0, 500) for detail.
    """
    low, high = min_timestep, scheduler.config.num_train_timesteps if max_timestep is None else max_timestep
    if high > scheduler.config.num_train_timesteps:
        raise RecipeError(f"train.max_timestep: {high} is beyond the base's {scheduler.config.num_train_timesteps}")
    if sampling == "cubic":
        u = torch.rand((batch_size,), generator=generator, device="cpu")
        return host_to_device((low + ((1 - u**3) * (high - low)).long()).clamp(low, high - 1), device)
    return host_to_device(torch.randint(low, high, (batch_size,), generator=generator, device="cpu"), device)


def input_perturbation(
    noise: torch.Tensor, gamma: float, random_strength: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The noise the UNet's input is made with under input perturbation (Ning et al. 2023,
    https://arxiv.org/abs/2301.11706): x_t is built from eps + gamma * xi, xi ~ N(0, I) fresh, while the target
    stays eps (or the v of eps). At sampling time the model's inputs come from its own imperfect earlier steps,
    never from the exact forward process; training on slightly wrong inputs narrows that gap (exposure bias).
    ~0.1 is the paper's value. `random_strength` draws the strength uniformly in [0, gamma) each step, as sd-scripts'
    `ip_noise_gamma_random_strength`. Drawn on the CPU from `generator` after the timesteps; gamma 0 draws nothing.
    """
    if not gamma:
        return noise
    strength = gamma * torch.rand((), generator=generator).item() if random_strength else gamma
    extra = torch.randn(noise.shape, generator=generator, dtype=noise.dtype)
    return noise + strength * host_to_device(extra, noise.device)


def training_schedule(scheduler: DDPMScheduler, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The schedule a step noises with: the base's, or with `zero_terminal_snr` the same rescaled to end at pure
    noise.

    SD's schedule leaves sqrt(alpha_bar_T) ~ 0.068 of the image in x_T, so training never sees pure noise while
    sampling starts from it, and the model cannot reach very dark or bright images (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", https://arxiv.org/abs/2305.08891, Algorithm 1): shift
    sqrt(alpha_bar) so the last is 0, scale it so the first is unchanged, and recompute the betas (diffusers'
    `rescale_betas_zero_snr`, the same as sd-scripts' `zero_terminal_snr`). At alpha_bar_T = 0 an epsilon target is
    the input itself, learned from nothing, and sampling's x0 = (x_T - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
    divides by 0: the paper trains v-prediction, and sdtune refuses an epsilon base (sd-scripts only warns).
    """
    if not zero_terminal_snr:
        return scheduler
    if scheduler.config.prediction_type == "epsilon":
        raise RecipeError(
            "train.zero_terminal_snr: this base predicts epsilon, which has nothing to learn at zero terminal SNR "
            "(its last step's input is the noise itself); it needs a v_prediction base"
        )
    return _zero_terminal_snr(scheduler)


def check_schedule(train: TrainConfig, scheduler: DDPMScheduler) -> None:
    """Refuses, when the base is loaded rather than at the first step, the schedule options this base cannot take."""
    training_schedule(scheduler, train.zero_terminal_snr)
    sample_timesteps(1, scheduler, "cpu", None, train.timestep_sampling, train.min_timestep, train.max_timestep)


@functools.lru_cache(maxsize=4)
def _zero_terminal_snr(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The rescaled twin of a run's scheduler, built once (schedulers hash by identity)."""
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet must predict, by the base scheduler's `prediction_type`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"base scheduler has prediction_type={prediction_type!r}; sdtune trains epsilon or v_prediction")


def elementwise_loss(
    model_pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss at every element, for sd-scripts' `loss_type`s. With d = prediction - target:

        l2          d^2
        l1          |d|
        huber       2c (sqrt(d^2 + c^2) - c)      ~ d^2 for |d| << c, ~ 2c|d| for |d| >> c
        smooth_l1   2 (sqrt(d^2 + c^2) - c)       the same divided by c: ~ d^2 / c, then ~ 2|d|

    The pseudo-Huber forms are smooth everywhere; above c they grow linearly, so a few outlier images (or pixels)
    pull the model less than under the MSE (Khrapov et al. 2024, https://arxiv.org/abs/2403.16728). `huber_c` holds
    one c per sample (`huber_threshold`).
    """
    if loss_type == "l2":
        return F.mse_loss(model_pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(model_pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"loss_type {loss_type!r}: expected l2, l1, huber or smooth_l1")
    c = huber_c.view(-1, *[1] * (model_pred.ndim - 1))
    excess = torch.sqrt((model_pred - target) ** 2 + c**2) - c
    return 2 * c * excess if loss_type == "huber" else 2 * excess


def huber_threshold(
    timesteps: torch.Tensor, scheduler: DDPMScheduler, schedule: str, huber_c: float, huber_scale: float = 1.0
) -> torch.Tensor:
    """The pseudo-Huber c of each sample, by sd-scripts' `huber_schedule` (T = num_train_timesteps):

        constant      c = huber_c * huber_scale
        exponential   c = huber_scale * exp(-a t) with a = -ln(huber_c) / T: huber_scale at t = 0, down to
                      huber_c * huber_scale at t = T
        snr           c = (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
                      = 1 / sqrt(SNR): 1 at low noise, down to huber_c at high noise (huber_scale plays no part,
                      as in sd-scripts)

    A scheduled c is MSE-like (large c) where the noise is small and the target precise, and robust (small c) at
    high noise, where the model can only guess and outliers weigh most.
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if schedule == "exponential":
        rate = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-rate * t) * huber_scale
    if schedule == "snr":
        sigma = compute_snr(scheduler, timesteps) ** -0.5
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r}: expected constant, exponential or snr")


def timestep_weights(
    losses: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """Per-sample losses re-weighted by their timestep's SNR = alpha_bar / (1 - alpha_bar).

    In terms of the x0 error, an epsilon loss is SNR * |x0_hat - x0|^2 and a v loss (SNR + 1) * |x0_hat - x0|^2, so
    each weighting divides by what the target already carries:
    - min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556) caps the weight of low-noise timesteps,
      whose easy, high-SNR losses otherwise dominate the gradient: x min(SNR, gamma) / SNR for epsilon,
      x min(SNR, gamma) / (SNR + 1) for v;
    - debiased estimation (Yu et al. 2024, https://arxiv.org/abs/2310.08442), as sd-scripts applies it, after
      min-SNR when both are on: x 1 / sqrt(SNR) for epsilon (the paper's practical weight: its ideal, 1 / SNR, spans
      too wide a range), x 1 / (SNR + 1) for v (that ideal, a uniform weight on the x0 error, which for v spans
      ~1000x, near the epsilon weight's ~500x; it stays finite at zero terminal SNR, where 1 / sqrt(SNR) would
      not). SNR is capped at 1000 here, as there.
    """
    if snr_gamma is None and not debiased:
        return losses
    snr = compute_snr(scheduler, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if snr_gamma is not None:
        clipped = torch.clamp(snr, max=snr_gamma)
        losses = losses * clipped / (snr + 1) if v_prediction else losses * clipped / snr
    if debiased:
        capped = torch.clamp(snr, max=DEBIASED_SNR_CAP)
        losses = losses / (capped + 1) if v_prediction else losses / capped.sqrt()
    return losses


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    train: TrainConfig | None = None,
    per_sample: bool = False,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The step's loss between prediction and target: `train.loss_type` at every element (`elementwise_loss`,
    with `huber_threshold`'s c), times `pixel_weights` (masked loss), averaged per sample, re-weighted by timestep
    (`timestep_weights`: `snr_gamma`, `debiased_estimation_loss`), then averaged over the batch, the order
    sd-scripts applies them in.

    `per_sample` returns the [b] losses instead of their mean (DreamBooth weighs instance and class images apart).
    `pixel_weights` [b, 1, h, w] weighs each latent pixel (all channels alike); the mean stays over every pixel, as
    kohya's `apply_masked_loss`, so an image with a small mask adds a small loss rather than a magnified one.
    The plain MSE takes one fused `mse_loss` (what the step computed before there were options).
    """
    train = train or PLAIN_STEP
    model_pred, target = model_pred.float(), target.float()
    weighted = train.snr_gamma is not None or train.debiased_estimation_loss or pixel_weights is not None
    if train.loss_type == "l2" and not weighted and not per_sample:
        return F.mse_loss(model_pred, target, reduction="mean")
    huber_c = None
    if train.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_threshold(timesteps, scheduler, train.huber_schedule, train.huber_c, train.huber_scale)
    losses = elementwise_loss(model_pred, target, train.loss_type, huber_c)
    if pixel_weights is not None:
        losses = losses * pixel_weights.to(losses.device, losses.dtype)
    losses = losses.mean(dim=list(range(1, model_pred.ndim)))
    losses = timestep_weights(losses, timesteps, scheduler, train.snr_gamma, train.debiased_estimation_loss)
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
    model,
    scheduler: DDPMScheduler,
    batch,
    states: torch.Tensor,
    train,
    dtype: torch.dtype,
    per_sample: bool = False,
    prior_loss_weight: float = 1.0,
):
    """`denoising_step_loss` of one training `Batch` with the recipe's noise, timestep and loss keys, its latents
    in the run's dtype on the device of the text states, its noise drawn from the batch's generator, its loss
    weighted by its masks when it has them (masked loss). A batch that ends in regularization images
    (`batch.num_prior`) gives `prior_preservation_loss` at `prior_loss_weight`, unless `per_sample` asks for the
    [b] losses."""
    masks = getattr(batch, "masks", None)
    num_prior = getattr(batch, "num_prior", 0)
    losses = denoising_step_loss(
        model,
        scheduler,
        host_to_device(batch.latents, states.device).to(dtype),
        states.to(dtype),
        train,
        generator=batch.generator,
        per_sample=per_sample or bool(num_prior),
        pixel_weights=None if masks is None else host_to_device(masks, states.device),
    )
    if num_prior and not per_sample:
        return prior_preservation_loss(losses, num_prior, prior_loss_weight)
    return losses


def denoising_step_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    train: TrainConfig | None = None,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
    pixel_weights: torch.Tensor | None = None,
    **unet_kwargs,
) -> torch.Tensor:
    """One training step's loss: draw noise and timesteps, noise the latents, predict, compare.

    `train` is the recipe's train section (default: every option off). The draws, in this order, each only when
    its option is on: the noise, its offset, its pyramid levels, the timesteps, the input perturbation.
    `unet_kwargs` reach the UNet call as they are (e.g. ControlNet residuals); `per_sample` keeps the [b] losses;
    `pixel_weights` [b, 1, h, w] weighs each latent pixel's loss (masked loss, see `diffusion_loss`).
    """
    train = train or PLAIN_STEP
    scheduler = training_schedule(scheduler, train.zero_terminal_snr)
    noise = noise_like(
        latents, train.noise_offset, generator, train.multires_noise_iterations, train.multires_noise_discount
    )
    timesteps = sample_timesteps(
        latents.shape[0],
        scheduler,
        latents.device,
        generator,
        train.timestep_sampling,
        train.min_timestep,
        train.max_timestep,
    )
    model_input = input_perturbation(noise, train.ip_noise_gamma, train.ip_noise_gamma_random_strength, generator)
    noisy_latents = scheduler.add_noise(latents, model_input, timesteps)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False, **unet_kwargs)[0]
    target = training_target(scheduler, latents, noise, timesteps)
    return diffusion_loss(model_pred, target, timesteps, scheduler, train, per_sample, pixel_weights)
