"""The best rank-r approximation of a weight delta, split into LoRA's two factors (used to extract and merge LoRAs)."""

from __future__ import annotations

import torch


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """delta [out,in] or [out,in,kh,kw] -> (up [out,r] or [out,r,1,1], down [r,in] or [r,in,kh,kw]) with
    up @ down ~= delta (best rank-r in Frobenius norm, singular values split as sqrt between both), in float32.

    By Eckart-Young the truncated SVD U_r S_r V_r^T is the closest rank-r matrix to `delta`; giving each factor
    sqrt(S_r) keeps their norms balanced, as LoRA training would. A convolution's delta is flattened to
    [out, in*kh*kw]: `down` is then a kh x kw convolution into r channels and `up` a 1x1 convolution out of them,
    which is peft's and kohya's LoCon layout. If `rank` exceeds min(out, in*kh*kw) the factors are padded with
    zeros to `rank`, so every module of an extracted LoRA has the same rank.
    """
    if delta.ndim not in (2, 4):
        raise ValueError(f"factorize: expected a [out,in] or [out,in,kh,kw] delta, got shape {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"factorize: rank must be >= 1, got {rank}")
    out_features = delta.shape[0]
    matrix = delta.reshape(out_features, -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = min(rank, s.shape[0])
    root = s[:kept].sqrt()
    up = torch.zeros(out_features, rank)
    down = torch.zeros(rank, matrix.shape[1])
    up[:, :kept] = u[:, :kept] * root
    down[:kept] = root[:, None] * vh[:kept]
    if delta.ndim == 4:
        return up[:, :, None, None].contiguous(), down.reshape(rank, *delta.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()
