"""Losses and noise (issue 22, item 2): sd-scripts' `loss_type`/`huber_*`, `debiased_estimation_loss`, multires
noise, input perturbation, a timestep range and zero terminal SNR, all in the one step of trainers/core/diffusion.py.

Each option is checked for what it changes, on small tensors with values worked out by hand; the default recipe's
step is checked to be bit-identical to the step as it was before these options existed (a frozen copy below); and
two real LoRA runs show the trainer taking them all, and refusing zero terminal SNR on an epsilon base in one line.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import random
import re
import shutil
from random import Random

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICKSTART, ROOT, run_trainer
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdtune.adapters import sampling
from sdtune.trainers.core import diffusion
from sdtune.trainers.core.recipe import TRAINERS, RecipeError, TrainConfig, recipe_from_dict

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def sd15_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(**SD15, prediction_type=prediction_type)


class RecordingUNet:
    """A stand-in UNet: remembers what it was called with and predicts a fixed function of its input."""

    def __call__(self, sample, timesteps, states, return_dict=False):
        self.sample, self.timesteps = sample, timesteps
        return (0.5 * sample + 0.01 * timesteps.view(-1, 1, 1, 1) + states.mean(),)


def latents_and_states(batch: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(123)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 3, 5, generator=g)


def step(train: TrainConfig | None, scheduler=None, seed: int = 7, per_sample: bool = False):
    """(loss, the UNet's input, its timesteps) of one `denoising_step_loss` with the step's generator at `seed`."""
    unet, (latents, states) = RecordingUNet(), latents_and_states()
    generator = torch.Generator().manual_seed(seed)
    loss = diffusion.denoising_step_loss(
        unet, scheduler or sd15_scheduler(), latents, states, train, generator=generator, per_sample=per_sample
    )
    return loss, unet.sample, unet.timesteps


# -- the default step is the step as it was ---------------------------------------------------------------------


def step_before_issue_22(unet, scheduler, latents, states, noise_offset, snr_gamma, generator, sampling, per_sample):
    """trainers/core/diffusion.py's `denoising_step_loss` at 3d41733, before the options of issue 22, condensed."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    high = scheduler.config.num_train_timesteps
    if sampling == "cubic":
        u = torch.rand((latents.shape[0],), generator=generator)
        timesteps = ((1 - u**3) * high).long().clamp(0, high - 1)
    else:
        timesteps = torch.randint(0, high, (latents.shape[0],), generator=generator)
    pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states, return_dict=False)[0].float()
    v = scheduler.config.prediction_type == "v_prediction"
    target = (scheduler.get_velocity(latents, noise, timesteps) if v else noise).float()
    if snr_gamma is None and not per_sample:
        return F.mse_loss(pred, target, reduction="mean")
    losses = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        losses = losses * torch.clamp(snr, max=snr_gamma) / ((snr + 1) if v else snr)
    return losses if per_sample else losses.mean()


BEFORE = {  # the recipe keys that existed before issue 22, and a per_sample step (DreamBooth's)
    "default": ({}, "epsilon", False),
    "min-snr": ({"snr_gamma": 5.0}, "epsilon", False),
    "min-snr v-prediction": ({"snr_gamma": 5.0}, "v_prediction", False),
    "noise offset + cubic": ({"noise_offset": 0.1, "timestep_sampling": "cubic"}, "epsilon", False),
    "per sample (DreamBooth)": ({}, "epsilon", True),
    "per sample + min-snr": ({"snr_gamma": 2.0}, "v_prediction", True),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_recipes_without_the_new_keys_train_bit_identically(name):
    keys, prediction_type, per_sample = BEFORE[name]
    train, scheduler = TrainConfig(**keys), sd15_scheduler(prediction_type)
    loss, sample, timesteps = step(train, scheduler, per_sample=per_sample)
    latents, states = latents_and_states()
    unet = RecordingUNet()
    expected = step_before_issue_22(
        unet,
        scheduler,
        latents,
        states,
        train.noise_offset,
        train.snr_gamma,
        torch.Generator().manual_seed(7),
        train.timestep_sampling,
        per_sample,
    )
    assert torch.equal(timesteps, unet.timesteps) and torch.equal(sample, unet.sample)
    assert torch.equal(loss, expected)


def test_every_trainer_computes_its_loss_through_the_core():
    """So that LoRA, DreamBooth and ControlNet all take every loss and noise key: each trainer calls
    `diffusion.batch_loss`, and none computes a loss of its own."""
    # preference tuning compares two plain MSEs (Diffusion-DPO): its step is the core's `dpo.dpo_step_loss`, which
    # takes the noise and timestep keys, and trainers/preference.py refuses the loss keys it cannot take
    core_loss = {"trainers/preference.py": "dpo_step_loss"}
    for script in TRAINERS.values():
        tree = ast.parse((ROOT / script).read_text())
        called = {
            getattr(n.func, "id", getattr(n.func, "attr", None)) for n in ast.walk(tree) if isinstance(n, ast.Call)
        }
        assert core_loss.get(script, "batch_loss") in called, script
        assert not called & {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "denoising_step_loss"}, script


# -- loss_type and huber_schedule -----------------------------------------------------------------------------------

# (loss_type, d = prediction - target, c, expected): d^2, |d|, 2c(sqrt(d^2 + c^2) - c), 2(sqrt(d^2 + c^2) - c)
ELEMENTWISE = [
    ("l2", 3.0, None, 9.0),
    ("l1", -3.0, None, 3.0),
    ("huber", 0.0, 0.5, 0.0),
    ("huber", 1.2, 0.5, 2 * 0.5 * (1.3 - 0.5)),  # sqrt(1.44 + 0.25) = 1.3
    ("huber", 4.0, 3.0, 2 * 3.0 * (5.0 - 3.0)),  # sqrt(16 + 9) = 5
    ("huber", 1e-3, 1.0, 1e-6),  # |d| << c: ~ d^2, the MSE
    ("huber", 1e3, 0.1, 2 * 0.1 * (1e3 - 0.1)),  # |d| >> c: ~ 2c(|d| - c), linear
    ("smooth_l1", 4.0, 3.0, 2 * (5.0 - 3.0)),
    ("smooth_l1", -1.2, 0.5, 2 * (1.3 - 0.5)),
    ("smooth_l1", 1e3, 0.1, 2 * (1e3 - 0.1)),
]


@pytest.mark.parametrize("loss_type,d,c,expected", ELEMENTWISE)
def test_elementwise_loss_known_values(loss_type, d, c, expected):
    target = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    c = None if c is None else torch.tensor([c], dtype=torch.float64)
    loss = diffusion.elementwise_loss(target + d, target, loss_type, c)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_huber_uses_each_samples_own_threshold():
    pred = torch.tensor([4.0, 4.0]).view(2, 1, 1, 1)
    loss = diffusion.elementwise_loss(pred, torch.zeros_like(pred), "huber", torch.tensor([3.0, 0.0]))
    assert loss.flatten().tolist() == pytest.approx([12.0, 0.0])  # c = 0 makes pseudo-Huber vanish


def test_huber_threshold_schedules():
    scheduler = sd15_scheduler()
    t = torch.tensor([0, 500, 999])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    expected = {
        ("constant", 0.2, 3.0): [0.6, 0.6, 0.6],
        # huber_scale * exp(t ln(c) / T) = huber_scale * c^(t / T)
        ("exponential", 0.2, 3.0): [3.0 * 0.2 ** (s / 1000) for s in (0, 500, 999)],
        ("snr", 0.2, 3.0): ((1 - 0.2) / (1 + sigma) ** 2 + 0.2).tolist(),  # huber_scale plays no part (sd-scripts)
    }
    for (schedule, c, scale), values in expected.items():
        got = diffusion.huber_threshold(t, scheduler, schedule, c, scale)
        assert got.tolist() == pytest.approx(values, rel=1e-5), schedule
    snr = diffusion.huber_threshold(t, scheduler, "snr", 0.1)
    assert snr[0] > 0.9 and snr[2] == pytest.approx(0.1, abs=0.005)  # ~1 at low noise, ~huber_c at high noise


def test_huber_loss_in_the_step_is_robust_to_an_outlier():
    """The reason for the option: one wild sample weighs ~linearly, not quadratically."""
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 100.0)])
    t, scheduler = torch.tensor([10, 10]), sd15_scheduler()
    mse = diffusion.diffusion_loss(pred, target, t, scheduler, TrainConfig(), per_sample=True)
    huber = diffusion.diffusion_loss(
        pred, target, t, scheduler, TrainConfig(loss_type="huber", huber_schedule="constant"), per_sample=True
    )
    assert mse[1] / mse[0] == pytest.approx(1e6)
    assert huber[1] / huber[0] == pytest.approx(
        2 * 0.1 * (math.hypot(100, 0.1) - 0.1) / (2 * 0.1 * (math.hypot(0.1, 0.1) - 0.1))
    )
    assert huber[1] / huber[0] < 3e3


# -- timestep weights: min-SNR and debiased estimation ----------------------------------------------------------


def four_step_scheduler(prediction_type: str) -> DDPMScheduler:
    """alpha_bar = 0.8, 0.5, 0.2, 0.1, so SNR = alpha_bar / (1 - alpha_bar) = 4, 1, 1/4, 1/9."""
    betas = [0.2, 0.375, 0.6, 0.5]
    return DDPMScheduler(num_train_timesteps=4, trained_betas=betas, prediction_type=prediction_type)


WEIGHTS = {  # (prediction type, snr_gamma, debiased) -> weight at SNR 4, 1, 1/4, 1/9
    ("epsilon", 2.0, False): [2 / 4, 1, 1, 1],  # min(SNR, gamma) / SNR
    ("v_prediction", 2.0, False): [2 / 5, 1 / 2, (1 / 4) / (5 / 4), (1 / 9) / (10 / 9)],  # min(SNR, gamma) / (SNR + 1)
    ("epsilon", None, True): [1 / 2, 1, 2, 3],  # 1 / sqrt(SNR)
    ("v_prediction", None, True): [1 / 5, 1 / 2, 4 / 5, 9 / 10],  # 1 / (SNR + 1)
    ("epsilon", 2.0, True): [1 / 4, 1, 2, 3],  # both, multiplied
    ("v_prediction", 2.0, True): [2 / 25, 1 / 4, 4 / 25, 9 / 100],
    ("epsilon", None, False): [1, 1, 1, 1],
}


@pytest.mark.parametrize("key", list(WEIGHTS), ids=lambda k: f"{k[0]}-gamma{k[1]}-debiased{k[2]}")
def test_timestep_weights_known_values(key):
    prediction_type, snr_gamma, debiased = key
    scheduler = four_step_scheduler(prediction_type)
    losses = torch.ones(4)
    got = diffusion.timestep_weights(losses, torch.arange(4), scheduler, snr_gamma, debiased)
    assert got.tolist() == pytest.approx(WEIGHTS[key], rel=1e-5)


def test_debiased_estimation_caps_the_snr_at_1000_and_stays_finite_at_zero_terminal_snr():
    scheduler = sd15_scheduler()
    assert compute_snr(scheduler, torch.tensor([0])).item() > 1100  # SD's SNR at t = 0 is ~1175
    weight = diffusion.timestep_weights(torch.ones(1), torch.tensor([0]), scheduler, debiased=True)
    assert weight.item() == pytest.approx(1 / math.sqrt(1000))
    v = diffusion.training_schedule(sd15_scheduler("v_prediction"), zero_terminal_snr=True)
    weights = diffusion.timestep_weights(torch.ones(2), torch.tensor([0, 999]), v, snr_gamma=5.0, debiased=True)
    assert torch.isfinite(weights).all() and weights[1] == 0  # min-SNR gives the SNR-0 step no weight, NaN-free


def test_diffusion_loss_composes_loss_type_then_weights_per_sample():
    scheduler = four_step_scheduler("epsilon")
    pred = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 4, 2, 2)
    target, t = torch.zeros_like(pred), torch.tensor([0, 2])
    train = TrainConfig(loss_type="l1", debiased_estimation_loss=True)
    per_sample = diffusion.diffusion_loss(pred, target, t, scheduler, train, per_sample=True)
    assert per_sample.tolist() == pytest.approx([1.0 / 2, 2.0 * 2])  # |d| x 1/sqrt(SNR) at SNR 4 and 1/4
    assert diffusion.diffusion_loss(pred, target, t, scheduler, train).item() == pytest.approx(2.25)


# -- noise: multires, input perturbation --------------------------------------------------------------------------


def test_pyramid_noise_replays_from_the_steps_generator_alone():
    """Level 0 is full size whatever r is; every draw (r included) comes from the generator, none from Python's or
    torch's global generators, so a resumed run draws the same."""
    noise_gen, replay = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 8, 8, generator=noise_gen)
    torch.manual_seed(0)
    random.seed(0)
    got = diffusion.pyramid_noise(noise, 1, 0.3, noise_gen)
    assert torch.equal(torch.rand(1), torch.rand(1, generator=torch.Generator().manual_seed(0)))
    assert random.random() == Random(0).random()
    eps = torch.randn(2, 4, 8, 8, generator=replay)
    torch.rand((), generator=replay)  # r
    summed = eps + torch.randn(2, 4, 8, 8, generator=replay)
    assert torch.allclose(got, summed / summed.std(), atol=1e-6)
    assert torch.equal(noise_gen.get_state(), replay.get_state())


def test_pyramid_noise_is_unit_variance_with_low_frequencies():
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(16, 4, 64, 64, generator=g)
    pyramid = diffusion.pyramid_noise(plain.clone(), 8, 0.8, g)
    assert pyramid.shape == plain.shape and pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    # the mean of each channel: ~N(0, 1/4096) for plain noise, far wider with coarse levels in it
    assert pyramid.mean(dim=(2, 3)).std() > 10 * plain.mean(dim=(2, 3)).std()


def test_pyramid_noise_keeps_a_half_precision_dtype():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g).to(torch.bfloat16)
    assert diffusion.pyramid_noise(noise, 3, 0.3, g).dtype == torch.bfloat16


def test_input_perturbation_known_values_and_no_draw_when_off():
    noise = torch.ones(1, 1, 2, 2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert diffusion.input_perturbation(noise, 0.0, generator=g) is noise and torch.equal(g.get_state(), state)
    xi = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(diffusion.input_perturbation(noise, 0.1, generator=g), noise + 0.1 * xi)
    replay = torch.Generator().manual_seed(9)
    u = torch.rand((), generator=replay).item()
    xi = torch.randn(1, 1, 2, 2, generator=replay)
    got = diffusion.input_perturbation(noise, 0.1, True, torch.Generator().manual_seed(9))
    assert torch.equal(got, noise + 0.1 * u * xi) and 0 <= u < 1


def test_input_perturbation_changes_the_input_not_the_target():
    class Zero(RecordingUNet):
        def __call__(self, sample, timesteps, states, return_dict=False):
            super().__call__(sample, timesteps, states)
            return (torch.zeros_like(sample),)

    def run(**keys):
        unet, (latents, states) = Zero(), latents_and_states()
        g = torch.Generator().manual_seed(1)
        loss = diffusion.denoising_step_loss(unet, sd15_scheduler(), latents, states, TrainConfig(**keys), g)
        return loss, unet.sample

    plain_loss, plain_input = run()
    loss, perturbed_input = run(ip_noise_gamma=0.5)
    assert torch.equal(loss, plain_loss)  # a zero prediction's loss is |target|^2: the target is still eps
    assert not torch.equal(perturbed_input, plain_input)


def test_noise_options_change_the_step_only_when_on():
    base_loss, base_input, base_t = step(TrainConfig())
    for keys in (
        {"multires_noise_iterations": 6},
        {"ip_noise_gamma": 0.1},
        {"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True},
    ):
        _, sample, t = step(TrainConfig(**keys))
        assert torch.equal(t, base_t) == ("multires_noise_iterations" not in keys), keys  # pyramid draws come first
        assert not torch.equal(sample, base_input), keys
    _, sample, _ = step(TrainConfig(multires_noise_discount=0.9, huber_c=0.3, huber_schedule="constant"))
    assert torch.equal(sample, base_input)  # settings of options that are off change nothing


# -- timesteps -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "cubic"])
def test_timestep_range_holds_every_draw(sampling):
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(20_000, sd15_scheduler(), "cpu", g, sampling, min_timestep=200, max_timestep=300)
    assert t.min().item() == 200 and t.max().item() == 299
    if sampling == "cubic":  # still mostly high noise within the range
        assert (t >= 250).float().mean() > 0.75


def test_timestep_range_beyond_the_schedule_is_named():
    with pytest.raises(RecipeError, match="train.max_timestep: 1000 is beyond the base's 500"):
        diffusion.sample_timesteps(1, DDPMScheduler(num_train_timesteps=500), "cpu", max_timestep=1000)


# -- zero terminal SNR --------------------------------------------------------------------------------------------


def test_zero_terminal_snr_is_refused_on_an_epsilon_base():
    with pytest.raises(RecipeError, match="^train.zero_terminal_snr: this base predicts epsilon"):
        diffusion.training_schedule(sd15_scheduler("epsilon"), zero_terminal_snr=True)


def test_zero_terminal_snr_rescales_the_schedule_as_the_paper():
    """Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) shifted to end at 0 and scaled to start where it started."""
    plain = sd15_scheduler("v_prediction")
    assert diffusion.training_schedule(plain) is plain
    rescaled = diffusion.training_schedule(plain, zero_terminal_snr=True)
    assert diffusion.training_schedule(plain, zero_terminal_snr=True) is rescaled  # built once per run
    before, after = plain.alphas_cumprod.double().sqrt(), rescaled.alphas_cumprod.double().sqrt()
    assert before[-1].item() == pytest.approx(0.068, abs=0.001)  # SD's x_T keeps ~7% of the image
    assert after[-1].item() == 0 and after[0].item() == pytest.approx(before[0].item(), rel=1e-6)
    expected = (before - before[-1]) * before[0] / (before[0] - before[-1])
    assert torch.allclose(after, expected, atol=1e-6)


def test_zero_terminal_snr_step_trains_the_last_timestep_on_pure_noise():
    train = TrainConfig(zero_terminal_snr=True, min_timestep=999)
    loss, sample, t = step(train, sd15_scheduler("v_prediction"), per_sample=True)
    latents, _ = latents_and_states()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    assert t.tolist() == [999] * 4 and torch.equal(sample, noise)  # x_T is the noise itself
    pred = 0.5 * noise + 0.01 * 999 + latents_and_states()[1].mean()
    expected = ((pred + latents) ** 2).mean(dim=[1, 2, 3])  # the v target at alpha_bar = 0 is -x0
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_sampling_with_zero_terminal_snr_uses_the_rescaled_schedule_from_pure_noise():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    pndm = PNDMScheduler(**SD15, prediction_type="v_prediction", steps_offset=1, skip_prk_steps=True)
    sampler = sampling.zero_terminal_snr_sampler(pndm)  # PNDM has no zero-SNR schedule: DDIM, the paper's
    assert type(sampler).__name__ == "DDIMScheduler" and sampler.config.prediction_type == "v_prediction"
    assert sampler.alphas_cumprod[-1].item() == 0
    sampler.set_timesteps(4)
    assert sampler.timesteps[0].item() == 999  # "trailing": the first step is at t = T
    euler = sampling.zero_terminal_snr_sampler(EulerDiscreteScheduler.from_config(pndm.config))
    assert type(euler) is EulerDiscreteScheduler and euler.config.rescale_betas_zero_snr


def test_validation_samples_with_the_runs_schedule(toy_pipe):
    from sdtune.trainers.core.validation import Validator

    keys = {"validation": {"prompts": ["a red circle"], "seeds": [0]}}
    for zero_terminal_snr in (False, True):
        recipe = recipe_from_dict({**keys, "train": {"zero_terminal_snr": zero_terminal_snr}})
        validator = Validator(recipe, toy_pipe, None, "unused", "toy")
        assert [s.zero_terminal_snr for s in validator.settings] == [zero_terminal_snr]
    settings = sampling.SampleSettings("a red circle", steps=2, guidance=3.0)
    plain, rescaled = sampling.generate(toy_pipe, [settings, dataclasses.replace(settings, zero_terminal_snr=True)])
    assert "Sampler: DDIM" in rescaled.parameters and "Sampler: DDIM" not in plain.parameters
    assert type(toy_pipe.scheduler).__name__ == "PNDMScheduler"  # the pipeline's own sampler is put back


# -- recipe keys --------------------------------------------------------------------------------------------------

BAD = [
    ({"min_timestep": 500, "max_timestep": 500}, "train: min_timestep (500) must be below max_timestep (500)"),
    ({"min_timestep": 900, "max_timestep": 100}, "train: min_timestep (900) must be below max_timestep (100)"),
    ({"min_timestep": 1000}, "train.min_timestep: Input should be less than or equal to 999"),
    ({"max_timestep": 1001}, "train.max_timestep: Input should be less than or equal to 1000"),
    ({"huber_c": 0}, "train.huber_c: Input should be greater than 0"),
    ({"huber_c": -0.1}, "train.huber_c: Input should be greater than 0"),
    ({"huber_scale": 0}, "train.huber_scale: Input should be greater than 0"),
    ({"loss_type": "mse"}, "train.loss_type: Input should be 'l2', 'l1', 'huber' or 'smooth_l1'"),
    ({"huber_schedule": "linear"}, "train.huber_schedule: Input should be 'constant', 'exponential' or 'snr'"),
    ({"multires_noise_iterations": -1}, "train.multires_noise_iterations: Input should be greater than or equal"),
    ({"multires_noise_discount": 1.5}, "train.multires_noise_discount: Input should be less than or equal to 1"),
    ({"ip_noise_gamma": -0.1}, "train.ip_noise_gamma: Input should be greater than or equal to 0"),
    ({"ip_noise_gamma_random_strength": True}, "train: ip_noise_gamma_random_strength needs ip_noise_gamma > 0"),
    ({"huber_k": 0.1}, "train.huber_k: unknown key (did you mean 'huber_c'?)"),
]


@pytest.mark.parametrize("keys,message", BAD, ids=[m.split(":")[1].strip().split()[0] for _, m in BAD])
def test_bad_loss_and_noise_keys_are_one_line_naming_the_key(keys, message):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"train": keys}, "r.yaml")
    assert str(error.value).startswith(f"r.yaml: {message}") and "\n" not in str(error.value)


def test_kohya_names_and_values_are_accepted():
    keys = {
        "loss_type": "smooth_l1",
        "huber_schedule": "exponential",
        "huber_c": 0.2,
        "huber_scale": 1.5,
        "debiased_estimation_loss": True,
        "multires_noise_iterations": 8,
        "multires_noise_discount": 0.3,
        "ip_noise_gamma": 0.1,
        "ip_noise_gamma_random_strength": True,
        "min_timestep": 0,
        "max_timestep": 1000,
        "zero_terminal_snr": True,
    }
    assert {k: getattr(recipe_from_dict({"train": keys}).train, k) for k in keys} == keys


# -- the trainer, for real ----------------------------------------------------------------------------------------

SHORT = ["train.max_train_steps=3", "train.train_batch_size=2", "validation.toy_score=[]", "output.register=false"]
EVERY_OPTION = [
    "train.loss_type=huber",
    "train.huber_schedule=snr",
    "train.debiased_estimation_loss=true",
    "train.snr_gamma=5",
    "train.multires_noise_iterations=4",
    "train.ip_noise_gamma=0.1",
    "train.ip_noise_gamma_random_strength=true",
    "train.min_timestep=100",
    "train.max_timestep=900",
    "train.zero_terminal_snr=true",
]


def test_lora_trains_with_every_option_on_a_v_prediction_base(tmp_path):
    base = tmp_path / "toy-v"
    shutil.copytree(ROOT / "adapters" / "toy_base", base)
    config = base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "v_prediction"}))
    out = tmp_path / "run"
    args = [str(QUICKSTART), f"base={base}", f"output.dir={out}", *SHORT, *EVERY_OPTION]
    args += ["validation.prompts=[a red circle]", "validation.seeds=[0]", "validation.num_inference_steps=3"]
    proc = run_trainer(args, tmp_path / "cache")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["recipe"]["train"]["loss_type"] == "huber" and manifest["recipe"]["train"]["zero_terminal_snr"]
    assert math.isfinite(manifest["training"]["final_loss"])


def test_zero_terminal_snr_on_an_epsilon_base_stops_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = run_trainer([str(QUICKSTART), f"output.dir={out}", *SHORT, "train.zero_terminal_snr=true"], tmp_path)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    # one line of its own, no traceback: refused as the base loads, before a progress bar or a step
    assert re.search(
        r"^error: train\.zero_terminal_snr: this base predicts epsilon[^\n]*v_prediction base\n", proc.stderr, re.M
    )
    assert "steps" not in proc.stderr.split("error:")[0]
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("*.safetensors"))
