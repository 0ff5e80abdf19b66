"""TAPA attention in plain PyTorch with block-wise online softmax (the path CPU training uses).

The forward pass walks query blocks and, inside each, key blocks, keeping a running max, sum and
output (FlashAttention's online softmax). The backward pass recomputes each score tile from q, k,
the positions and the saved log-sum-exp instead of storing probabilities, so memory is
O(seq * block), not O(seq^2): 8K+ tokens fit on a CPU box.

Scores are computed in float32 (float64 for float64 inputs), whatever the input dtype.
"""

import math

import torch

DEFAULT_BLOCK = 256


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_bounds(pos, block):
    """Per block of columns of pos (B, S): (start, end, min position, max position) over the batch."""
    bounds = []
    for start in range(0, pos.shape[1], block):
        chunk = pos[:, start : start + block]
        bounds.append((start, start + chunk.shape[1], int(chunk.min()), int(chunk.max())))
    return bounds


class _Tile:
    """One (query block, key block) tile of scores and the pieces its gradient needs.

    q, k: (B, H, rows, D) in the compute dtype; q_pos, k_pos: (B, rows).
    """

    def __init__(self, q, k, q_pos, k_pos, *, alpha, amp_dim, phase, causal):
        phase_dim = q.shape[-1] - amp_dim
        self.amp_scale = 1.0 / math.sqrt(amp_dim)
        self.phase_scale = 1.0 / math.sqrt(phase_dim)
        self.amplitude = q[..., :amp_dim] @ k[..., :amp_dim].transpose(-1, -2) * self.amp_scale
        if phase == "quadratic":
            phi = q[..., amp_dim:] @ k[..., amp_dim:].transpose(-1, -2) * self.phase_scale
        else:
            phi = (q[..., amp_dim:].sum(-1)[..., :, None] + k[..., amp_dim:].sum(-1)[..., None, :]) * self.phase_scale
        offset = q_pos[:, :, None] - k_pos[:, None, :]
        distance = offset.abs().to(q.dtype)
        self.dist_pow = torch.where(distance > 0, distance.pow(alpha), 0.0)[:, None]
        # cos(2 pi t) only depends on t modulo 1: reduce to [-1/2, 1/2] turns before the cos so a
        # large |m - n|^alpha * phi keeps its precision.
        turns = self.dist_pow * phi
        angle = 2 * math.pi * (turns - torch.round(turns))
        self.cos, self.angle = torch.cos(angle), angle
        self.visible = (offset >= 0)[:, None] if causal else None

    def scores(self):
        s = self.amplitude * self.cos
        return s if self.visible is None else s.masked_fill(~self.visible, float("-inf"))

    def backward(self, d_scores):
        """Split dL/ds into dL/d(amplitude) and dL/d(phi)."""
        d_amplitude = d_scores * self.cos
        d_phi = -d_scores * self.amplitude * torch.sin(self.angle) * (2 * math.pi) * self.dist_pow
        return d_amplitude, d_phi


def _heads_first(x, dtype, group=1):
    """(B, S, H, D) -> (B, H*group, S, D) in dtype, repeating each head `group` times (GQA)."""
    x = x.transpose(1, 2).to(dtype)
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _forward(q, k, v, q_pos, k_pos, options, block_q, block_k):
    """q, k, v: (B, H, S, D) compute dtype, heads already matched. Returns out (B, H, Sq, D), lse (B, H, Sq)."""
    causal = options["causal"]
    batch, heads, seq_q, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((batch, heads, seq_q), float("-inf"), dtype=q.dtype, device=q.device)
    key_blocks = _block_bounds(k_pos, block_k)
    for q0, q1, _, q_max in _block_bounds(q_pos, block_q):
        row_max = torch.full((batch, heads, q1 - q0), float("-inf"), dtype=q.dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros_like(q[:, :, q0:q1])
        for k0, k1, k_min, _ in key_blocks:
            if causal and k_min > q_max:  # every key of this block lies after every query
                continue
            tile = _Tile(q[:, :, q0:q1], k[:, :, k0:k1], q_pos[:, q0:q1], k_pos[:, k0:k1], **options)
            s = tile.scores()
            new_max = torch.maximum(row_max, s.amax(-1))
            safe_max = torch.where(torch.isinf(new_max), 0.0, new_max)  # rows with nothing visible yet
            probs = torch.exp(s - safe_max[..., None])
            rescale = torch.exp(row_max - safe_max)
            row_sum = row_sum * rescale + probs.sum(-1)
            acc = acc * rescale[..., None] + probs @ v[:, :, k0:k1]
            row_max = new_max
        seen = row_sum > 0
        out[:, :, q0:q1] = torch.where(seen[..., None], acc / row_sum.clamp_min(1e-30)[..., None], 0.0)
        lse[:, :, q0:q1] = torch.where(seen, row_max + torch.log(row_sum.clamp_min(1e-30)), float("-inf"))
    return out, lse


def _backward(d_out, d_lse, q, k, v, out, lse, q_pos, k_pos, options, block_q, block_k):
    """Gradients for q, k, v in (B, H, S, D) layout, recomputing each score tile."""
    amp_dim, causal, phase = options["amp_dim"], options["causal"], options["phase"]
    # rowsum(dO * O) is the softmax Jacobian's diagonal term; lse's own gradient enters the same way
    # (d lse_i / d s_ij = P_ij), so partial results merged through their lse backpropagate exactly.
    delta = (d_out * out).sum(-1)
    if d_lse is not None:
        delta = delta - d_lse
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    key_blocks = _block_bounds(k_pos, block_k)
    for q0, q1, _, q_max in _block_bounds(q_pos, block_q):
        q_blk, do_blk = q[:, :, q0:q1], d_out[:, :, q0:q1]
        lse_blk = lse[:, :, q0:q1, None]
        for k0, k1, k_min, _ in key_blocks:
            if causal and k_min > q_max:
                continue
            k_blk, v_blk = k[:, :, k0:k1], v[:, :, k0:k1]
            tile = _Tile(q_blk, k_blk, q_pos[:, q0:q1], k_pos[:, k0:k1], **options)
            probs = torch.exp(tile.scores() - torch.where(torch.isinf(lse_blk), 0.0, lse_blk))
            probs = torch.where(torch.isinf(lse_blk), 0.0, probs)
            dv[:, :, k0:k1] += probs.transpose(-1, -2) @ do_blk
            d_scores = probs * (do_blk @ v_blk.transpose(-1, -2) - delta[:, :, q0:q1, None])
            d_amp, d_phi = tile.backward(d_scores)
            d_amp = d_amp * tile.amp_scale
            d_phi = d_phi * tile.phase_scale
            dq[:, :, q0:q1, :amp_dim] += d_amp @ k_blk[..., :amp_dim]
            dk[:, :, k0:k1, :amp_dim] += d_amp.transpose(-1, -2) @ q_blk[..., :amp_dim]
            if phase == "quadratic":
                dq[:, :, q0:q1, amp_dim:] += d_phi @ k_blk[..., amp_dim:]
                dk[:, :, k0:k1, amp_dim:] += d_phi.transpose(-1, -2) @ q_blk[..., amp_dim:]
            else:  # phi depends on each phase coordinate through a plain sum
                dq[:, :, q0:q1, amp_dim:] += d_phi.sum(-1)[..., None]
                dk[:, :, k0:k1, amp_dim:] += d_phi.sum(-2)[..., None]
    return dq, dk, dv


class _BlockwiseTapa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, options, block_q, block_k):
        dtype = _compute_dtype(q.dtype)
        group = q.shape[2] // k.shape[2]
        qh, kh, vh = _heads_first(q, dtype), _heads_first(k, dtype, group), _heads_first(v, dtype, group)
        out, lse = _forward(qh, kh, vh, q_pos, k_pos, options, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.options, ctx.blocks = options, (block_q, block_k)
        return out.transpose(1, 2).to(q.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        grads = _gradients(d_out, d_lse, q, k, v, out, lse, q_pos, k_pos, ctx.options, *ctx.blocks)
        return (*grads, None, None, None, None, None)


def _gradients(d_out, d_lse, q, k, v, out, lse, q_pos, k_pos, options, block_q, block_k):
    """dq, dk, dv in the input layout (B, S, H, D) and dtypes; out, lse in (B, H, Sq[, D]) compute dtype."""
    dtype = out.dtype
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = _heads_first(q, dtype), _heads_first(k, dtype, group), _heads_first(v, dtype, group)
    dq, dk, dv = _backward(_heads_first(d_out, dtype), d_lse, qh, kh, vh, out, lse, q_pos, k_pos, options,
                           block_q, block_k)
    if group > 1:  # each key/value head served `group` query heads: sum their gradients
        batch, heads, seq_k, dim = dk.shape
        dk = dk.view(batch, heads // group, group, seq_k, dim).sum(2)
        dv = dv.view(batch, heads // group, group, seq_k, dim).sum(2)
    return [g.transpose(1, 2).to(x.dtype) for g, x in ((dq, q), (dk, k), (dv, v))]


def tapa_attention_blockwise_backward(d_out, q, k, v, out, lse, *, q_pos, k_pos, alpha, amp_dim, phase, causal,
                                      d_lse=None, block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK):
    """Gradients for these keys given a softmax's final out (B, Sq, Hq, D) and lse (B, Hq, Sq), which may span
    more keys than k holds (context parallelism computes each key block's share this way)."""
    options = dict(alpha=alpha, amp_dim=amp_dim, phase=phase, causal=causal)
    dtype = _compute_dtype(q.dtype)
    d_lse = None if d_lse is None else d_lse.to(dtype)
    return _gradients(d_out, d_lse, q, k, v, _heads_first(out, dtype), lse.to(dtype), q_pos, k_pos, options,
                      block_q, block_k)


def tapa_attention_blockwise(
    q, k, v, *, q_pos, k_pos, alpha, amp_dim, phase, causal, block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK
):
    """q: (B, Sq, Hq, D), k, v: (B, Sk, Hkv, D), positions (B, S) int64.

    Returns out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) in float32 (float64 for float64 input);
    both are differentiable.
    """
    options = dict(alpha=alpha, amp_dim=amp_dim, phase=phase, causal=causal)
    return _BlockwiseTapa.apply(q, k, v, q_pos, k_pos, options, block_q, block_k)
