"""Rotary position embedding for the RoPE baselines: plain RoPE, position interpolation (PI), YaRN.

Applied from explicit token positions inside the core attention (see attention.py), the same way
TAPA reads its positions, so context-parallel shards and packed documents work alike for both.
The layout is Megatron's non-interleaved one: dimension i rotates with dimension i + D/2.
"""

import math

import torch

SCALINGS = ("none", "pi", "yarn")


def rope_inverse_frequencies(head_dim, base, scaling="none", factor=1.0, original_max_position=8192,
                             beta_fast=32.0, beta_slow=1.0):
    """Per-pair angular frequencies (D/2,) in float32.

    pi:   every frequency divided by `factor` (positions squeezed into the trained range).
    yarn: high frequencies (many rotations within the original context) kept, low ones divided by
          `factor`, a linear ramp between the dims that rotate beta_fast and beta_slow times.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"rope scaling {scaling!r} is unknown; use one of {SCALINGS}.")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = base ** -exponents
    if scaling == "pi":
        inv_freq = inv_freq / factor
    elif scaling == "yarn":
        # dim index at which a pair completes `rotations` turns over the original context
        def dim_for(rotations):
            return head_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_for(beta_fast)), 0)
        high = min(math.ceil(dim_for(beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def yarn_attention_scale(scaling, factor):
    """YaRN's 'temperature': q and k are each multiplied by 0.1 ln(s) + 1; 1 otherwise."""
    return 0.1 * math.log(factor) + 1.0 if scaling == "yarn" and factor > 1 else 1.0


def apply_rope(x, positions, inv_freq, scale=1.0):
    """Rotate x (B, S, H, D) by angle position * inv_freq; positions (B, S) int64."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(x.device)  # (B, S, D/2)
    cos = (torch.cos(angles) * scale).repeat(1, 1, 2)[:, :, None].to(x.dtype)
    sin = (torch.sin(angles) * scale).repeat(1, 1, 2)[:, :, None].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
