"""Low-rank factorization: the SVD primitive behind LoRA merges, rank resizes and LoRA extraction.

A weight change delta (out x in, or out x in x kh x kw for a conv, flattened to out x (in*kh*kw)) has the SVD
U S V^T. Its best rank-r approximation in the Frobenius norm (Eckart-Young) keeps the r largest singular values:
U_r S_r V_r^T. As a LoRA, up = U_r sqrt(S_r) and down = sqrt(S_r) V_r^T: splitting S evenly keeps both factors at
the same scale, which matters once they are stored in fp16. A conv's down keeps the kernel (r x in x kh x kw) and
its up is a 1x1 conv (out x r x 1 x 1), the LoCon layout every loader applies.
"""

from __future__ import annotations

import torch

from sdtune.adapters.errors import SdtuneError


class LowRankError(SdtuneError, ValueError):
    """A dynamic-rank method or parameter the user gave that has no meaning (`--dynamic`, `--param`)."""


def factorize(delta: torch.Tensor, rank: int, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """delta [out,in] or [out,in,kh,kw] -> (up [out,r] or [out,r,1,1], down [r,in] or [r,in,kh,kw]) with
    up @ down ~= delta (best rank-r in Frobenius norm, singular values split as sqrt between both), in float32.

    A `rank` above min(out, in*kh*kw) is lowered to it, unless `pad`: then the factors are padded with zeros to
    `rank`, so that every module of an extracted LoRA has the one rank its config names.
    """
    if delta.dim() not in (2, 4):
        raise ValueError(f"factorize: delta must be [out, in] or [out, in, kh, kw], got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"factorize: rank must be >= 1, got {rank}")
    matrix = delta.float().flatten(1)
    kept = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:kept].sqrt()
    up = u[:, :kept] * root
    down = root[:, None] * vh[:kept]
    if pad and kept < rank:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - kept)], dim=1)
        down = torch.cat([down, down.new_zeros(rank - kept, down.shape[1])])
    if delta.dim() == 4:
        return up.reshape(*up.shape, 1, 1).contiguous(), down.reshape(up.shape[1], *delta.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """The singular values of delta (flattened to out x in*kh*kw), largest first, float32."""
    return torch.linalg.svdvals(delta.float().flatten(1))


def dynamic_rank(s: torch.Tensor, method: str, param: float, max_rank: int) -> int:
    """The rank sd-scripts' `resize_lora` keeps for singular values `s` (largest first), between 1 and max_rank.

    Methods:
        sv_ratio: keep singular values within a factor `param` of the largest (s_i >= s_0 / param);
        sv_fro: keep the fewest that hold a share `param` of the Frobenius norm (sum s_i^2);
        sv_cumulative: keep the fewest whose sum is a share `param` of the sum of all.
    """
    if method == "sv_ratio":
        if param < 1:
            raise LowRankError(f"sv_ratio must be >= 1 (a ratio of singular values), got {param}")
        keep = int((s >= s[0] / param).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        if not 0 < param <= 1:
            raise LowRankError(f"{method} must be in (0, 1], got {param}")
        values = s.pow(2) if method == "sv_fro" else s
        share = values.cumsum(0) / values.sum().clamp_min(1e-30)
        keep = int((share < param - 1e-7).sum()) + 1
    else:
        raise LowRankError(f"dynamic method {method!r}: choose sv_ratio, sv_fro or sv_cumulative")
    return max(1, min(keep, max_rank))


def kept_share(s: torch.Tensor, rank: int) -> float:
    """Share of the Frobenius norm that a rank-`rank` truncation keeps (sd-scripts reports it per module)."""
    total = float(s.pow(2).sum())
    return 1.0 if total == 0 else (float(s[:rank].pow(2).sum()) / total) ** 0.5


__all__ = ["dynamic_rank", "factorize", "kept_share", "singular_values"]
