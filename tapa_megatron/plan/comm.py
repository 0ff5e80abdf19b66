"""Communication of a layout per layer and micro-batch, and when the ring's transfers hide behind compute.

Context-parallel ring (p2p, `tapa_megatron.parallel.ring`), per layer and micro-batch, each rank sends
(s = S/CP local tokens of each of b sequences, kv = (Hkv/TP)·D, e bytes per activation):

    forward    CP-1 hops of its current K, V block with the block's positions: 2·b·s·kv·e + 8·b·s
    backward   CP-1 hops of K, V again, and CP hops of the travelling dK, dV in fp32: 2·b·s·kv·4
    recompute  the forward ring runs a second time

Overlap: every step of the zigzag ring computes b·s²/2 (query, key) pairs (diagonal, lower and upper
cases alike), 4·D FLOPs each per query head, while the next block moves:

    compute  = 2·D·(Hq/TP)·b·s² / F        transfer = 2·b·s·(Hkv/TP)·D·e / BW
    hidden   when  s >= e·F / (g·BW),      g = Hq / Hkv  (TP cancels)

F is the attention kernel's achieved FLOP rate and BW the per-GPU link bandwidth in one direction.
The backward does 2.5x the forward's FLOPs against the same K, V transfer, but ring.py waits for each
dK, dV hop before the next step, so that transfer (fp32) is exposed as it stands.

Tensor parallelism with sequence parallelism moves, per layer, 2 all-gathers and 2 reduce-scatters
of the b·s·h activations in forward and again in backward; each rank sends (TP-1)/TP of each.
"""

from dataclasses import dataclass

from tapa_megatron.plan.memory import FP32

# Per-GPU bandwidth in one direction. H100 SXM NVLink 4: 900 GB/s counts both directions; a ring hop
# sends one way and receives the other, each at 450 GB/s. InfiniBand NDR: 400 Gb/s per GPU = 50 GB/s.
LINKS = {"NVLink": 450e9, "InfiniBand": 50e9}
# Planning figure for the fused TAPA kernel's forward on H100 (FLOP/s, FlashAttention's count): an
# assumption until a GPU run of `tapa bench attention` replaces it. Each (query, key, head) pair costs
# 4·D = 512 tensor-core FLOPs (0.52 ps at 989 TFLOP/s) and a cosine plus the softmax exp on the
# special-function units (about 3.9 T op/s on H100: 0.51 ps). Unless the two overlap perfectly (the
# Triton kernels do not schedule for it) that bounds the kernel near 500 TFLOP/s; 300 is 60% of it.
ATTENTION_FLOPS = 300e12
MATMUL_EFFICIENCY = 0.7  # share of the dense peak that large bf16 GEMMs reach (assumed; plan.speed)
BACKWARD_FLOPS_RATIO = 2.5  # FlashAttention's backward / forward FLOPs


@dataclass
class RingStep:
    """One step of the ring for one layer and micro-batch: seconds of compute and of transfer."""

    link: str
    forward_compute: float
    forward_transfer: float
    backward_compute: float
    backward_dkv_transfer: float  # the fp32 dK, dV hop, not overlapped in ring.py

    @property
    def forward_hidden(self):
        return self.forward_transfer <= self.forward_compute


def ring_link(layout, gpus_per_node):
    """Megatron orders ranks TP fastest, then CP: a CP group stays in a node while TP x CP fits in one."""
    return "NVLink" if layout.tp * layout.cp <= gpus_per_node else "InfiniBand"


def ring_bytes(model, layout, step):
    """(forward, backward) bytes one rank sends per layer and micro-batch with the p2p ring (0 at CP = 1)."""
    if layout.cp == 1:
        return 0.0, 0.0
    tokens = step.micro_batch * step.seq_len / layout.cp
    kv = model.num_query_groups // layout.tp * model.head_dim
    block = 2 * tokens * kv * step.activation_bytes + 8 * tokens  # K, V and their positions
    forward = (layout.cp - 1) * block * (2 if step.recompute else 1)
    backward = (layout.cp - 1) * block + layout.cp * 2 * tokens * kv * FP32
    return forward, backward


def tensor_parallel_bytes(model, layout, step):
    """Bytes one rank sends per layer and micro-batch for TP's collectives (forward + backward)."""
    if layout.tp == 1:
        return 0.0
    tokens = step.micro_batch * step.seq_len / layout.cp
    collective = (layout.tp - 1) / layout.tp * tokens * model.hidden_size * step.activation_bytes
    return collective * 4 * (3 if step.recompute else 2)


def ring_step(model, layout, step, gpus_per_node=8, attention_flops=ATTENTION_FLOPS):
    link = ring_link(layout, gpus_per_node)
    bandwidth = LINKS[link]
    s, b = step.seq_len / layout.cp, step.micro_batch
    heads_q, heads_kv = model.num_attention_heads // layout.tp, model.num_query_groups // layout.tp
    compute = 2 * model.head_dim * heads_q * b * s * s / attention_flops
    kv_bytes = 2 * b * s * heads_kv * model.head_dim
    return RingStep(link, compute, (kv_bytes * step.activation_bytes + 8 * b * s) / bandwidth,
                    BACKWARD_FLOPS_RATIO * compute, kv_bytes * FP32 / bandwidth)


def overlap_threshold(model, activation_bytes, bandwidth, attention_flops=ATTENTION_FLOPS):
    """Local tokens per sequence (S/CP) above which a forward ring step's transfer hides behind its compute."""
    group = model.num_attention_heads / model.num_query_groups
    return activation_bytes * attention_flops / (group * bandwidth)


def exposed_seconds(model, layout, step, gpus_per_node=8, attention_flops=ATTENTION_FLOPS):
    """Communication time per layer and micro-batch that compute does not hide: TP's collectives on
    NVLink (not overlapped) and, with CP, the ring's transfers beyond each step's compute."""
    exposed = tensor_parallel_bytes(model, layout, step) / LINKS["NVLink"]
    if layout.cp > 1:
        ring = ring_step(model, layout, step, gpus_per_node, attention_flops)
        forward_passes = 2 if step.recompute else 1
        exposed += (layout.cp - 1) * forward_passes * max(0.0, ring.forward_transfer - ring.forward_compute)
        exposed += (layout.cp - 1) * max(0.0, ring.forward_transfer - ring.backward_compute)
        exposed += layout.cp * ring.backward_dkv_transfer
    return exposed
