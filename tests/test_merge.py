"""Merge arithmetic on hand-built LoRA modules: factorize is the best rank-r, concat is exact, svd at full rank is
exact, linear is exact for one parent, resize picks sd-scripts' dynamic ranks; and a merged LoRA written in both
formats passes the export check on the toy base and is registered with its parents."""

from __future__ import annotations

import math

import pytest
import torch

from sdtune.adapters import lowrank
from sdtune.adapters.lora_modules import LoraModule
from sdtune.adapters.merge import MergeError, merge_concat, merge_linear, merge_svd, resize

torch.manual_seed(0)


def module(out=16, inp=12, rank=4, alpha=2.0, kernel=None) -> LoraModule:
    down = torch.randn(rank, inp, *(kernel or ()))
    up = torch.randn(out, rank, *((1, 1) if kernel else ()))
    return LoraModule(down, up, alpha)


@pytest.mark.parametrize("shape", [(16, 12), (16, 8, 3, 3), (5, 40)])
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_factorize_is_the_best_rank_r_with_balanced_factors(shape, rank):
    delta = torch.randn(*shape, dtype=torch.float64)
    up, down = lowrank.factorize(delta, rank)
    r = min(rank, shape[0], math.prod(shape[1:]))
    assert up.dtype == down.dtype == torch.float32
    assert tuple(up.shape) == ((shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r))
    assert tuple(down.shape) == (r, *shape[1:])
    approx = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    s = torch.linalg.svdvals(delta.flatten(1)).float()
    # Eckart-Young: the error of the best rank-r approximation is the norm of the dropped singular values
    assert torch.linalg.norm((approx - delta.float()).flatten()) == pytest.approx(
        float(s[r:].norm()), rel=1e-4, abs=1e-4
    )
    # sqrt split: each factor's columns / rows carry sqrt(s_i)
    assert torch.allclose(up.flatten(1).norm(dim=0), s[:r].sqrt(), rtol=1e-4)
    assert torch.allclose(down.flatten(1).norm(dim=1), s[:r].sqrt(), rtol=1e-4)


def test_factorize_bad_input():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lowrank.factorize(torch.ones(3, 3), 0)
    with pytest.raises(ValueError, match=r"\[out, in\] or \[out, in, kh, kw\]"):
        lowrank.factorize(torch.ones(3), 1)


def test_concat_is_the_exact_weighted_sum_and_svd_at_full_rank_too():
    a = {"m": module(rank=4, alpha=2.0), "conv": module(8, 6, 2, 4.0, kernel=(3, 3))}
    b = {"m": module(rank=2, alpha=8.0)}
    weights = [0.7, -1.3]
    expected = {"m": 0.7 * a["m"].delta() - 1.3 * b["m"].delta(), "conv": 0.7 * a["conv"].delta()}
    concat = merge_concat([a, b], weights)
    assert concat["m"].rank == 6 and concat["m"].alpha == 6.0 and concat["conv"].rank == 2
    svd = merge_svd([a, b], weights, rank=6)
    for merged in (concat, svd):
        for name, delta in expected.items():
            assert torch.allclose(merged[name].delta(), delta, atol=1e-4), name
    low = merge_svd([a, b], weights, rank=2, conv_rank=1)
    assert low["m"].rank == 2 and low["conv"].rank == 1 and low["m"].alpha == 2.0


def test_linear_is_exact_for_one_parent_and_needs_equal_ranks():
    a = {"m": module(rank=4, alpha=2.0)}
    merged = merge_linear([a], [-0.5])
    assert torch.allclose(merged["m"].delta(), -0.5 * a["m"].delta(), atol=1e-5)
    with pytest.raises(MergeError, match="linear merge needs equal ranks; m has ranks \\[2, 4\\]"):
        merge_linear([a, {"m": module(rank=2)}], [1, 1])
    with pytest.raises(MergeError, match="one weight per parent"):
        merge_concat([a], [1, 1])


def test_resize_fixed_and_dynamic_ranks_keep_the_scale():
    torch.manual_seed(1)
    # a rank-8 module whose product has singular values 8, 4, 2, 1, 0.5...: sv_ratio 5 keeps 8, 4, 2 (>= 8/5)
    u, _ = torch.linalg.qr(torch.randn(16, 8))
    v, _ = torch.linalg.qr(torch.randn(12, 8))
    s = torch.tensor([8, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    m = LoraModule((s[:, None] * v.T), u.clone(), alpha=4.0)  # up @ down = U S V^T; scale 4/8
    ratio, _ = resize({"m": m}, 8, "sv_ratio", 5)
    assert ratio["m"].rank == 3 and ratio["m"].scale == pytest.approx(m.scale)
    fro, stats = resize({"m": m}, 8, "sv_fro", 0.99)
    share = [lowrank.kept_share(s, r) for r in range(1, 9)]
    assert fro["m"].rank == next(r for r in range(1, 9) if share[r - 1] ** 2 >= 0.99 - 1e-6)
    assert stats["min_fro_kept"] ** 2 >= 0.99 - 1e-3
    fixed, stats = resize({"m": m}, 2)
    assert fixed["m"].rank == 2 and stats["ranks"] == {"min": 2, "max": 2, "mean": 2.0}
    expected = m.scale * (u[:, :2] * s[:2]) @ v.T[:2]
    assert torch.allclose(fixed["m"].delta(), expected, atol=1e-4)
    with pytest.raises(ValueError, match="sv_ratio must be >= 1"):
        resize({"m": m}, 8, "sv_ratio", 0.5)


@pytest.mark.parametrize("merge", [merge_linear, merge_concat, lambda p, w: merge_svd(p, w, 2, None)])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_weight_is_refused_before_any_arithmetic(merge, bad):
    parents = [{"m": module()}, {"m": module()}]
    with pytest.raises(MergeError, match=r"each must be a finite number"):
        merge(parents, [1.0, bad])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("toy-purple:0.8", ("toy-purple", 0.8)),
        ("runs/quickstart", ("runs/quickstart", 1.0)),
        ("C:/loras/x.safetensors", ("C:/loras/x.safetensors", 1.0)),  # a colon not before a number is the path's
        ("toy-purple:-0.5", ("toy-purple", -0.5)),
    ],
)
def test_name_weight_specs_parse(text, expected):
    from sdtune.adapters.compose import AdapterUse

    use = AdapterUse.parse(text)
    assert (use.ref, use.weight) == expected


@pytest.mark.parametrize("text", ["toy-purple:nan", "toy-purple:inf", "toy-purple:-inf"])
def test_name_weight_specs_refuse_non_finite_weights(text):
    from sdtune.adapters.compose import AdapterUse

    with pytest.raises(ValueError, match=f"{text}: the weight .* is not a finite number"):
        AdapterUse.parse(text)
