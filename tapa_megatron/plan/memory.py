"""Memory of the busiest GPU in a TAPA GPT training step under TP x CP x PP x DP, term by term.

    model state   bf16 weights, the DDP grad buffer (fp32: grad_reduce_in_fp32=True, as the trainer
                  sets it), the distributed optimizer's fp32 master weights and Adam m, v: 12 bytes per
                  parameter, sharded over DP x CP (Megatron shards it over the data-and-context group)
    activations   what autograd keeps from forward to backward (Korthikanti et al. 2022, redone item by
                  item for LLaMA layers: RMSNorm, GQA, SwiGLU, no biases, no dropout masks)
    workspace     the transient peak on top of them: logits, gradient temporaries, the recomputed
                  layer, the attention op's and the ring's own buffers

Activations follow what the code stores, item by item (`layer_items`), for three attention paths:
"fused" (the Triton kernels: Q, K, V, O and the log-sum-exp, like FlashAttention; TAPA's per-score
work, |m-n|^alpha and the cosine, is recomputed in the backward kernels and stores nothing), "torch"
(the CPU block-wise path: O in fp32) and "reference" (the eager formula: five (S, S) score-sized
matrices per head). `python -m tapa_megatron.plan --validate` checks the items against tensors
measured in real CPU runs.

Counts are per "local token": a rank holds n = micro_batch * seq_len / CP of them.
"""

from dataclasses import dataclass

ATTENTION_PATHS = ("fused", "torch", "reference")
SPECS = ("te", "local")
CP_COMMS = ("p2p", "all_gather", "a2a")
VOCAB_MULTIPLE = 128  # the trainer pads the vocabulary to a multiple of 128 x TP (train.trainer.padded_vocab_size)
TORCH_PATH_BLOCK = 256  # ops.blockwise.DEFAULT_BLOCK (a test keeps them equal)
# fp32 score tiles (batch x heads x block x block) alive at once in the block-wise backward: the
# tile's amplitude, angle, cosine, probabilities, dS and its two parts, matmul outputs, and the
# per-pair distances (one tile shared by the heads). Measured with the live-tensor tracker at 4 heads
# (the shared distance tiles make it drift slightly with the head count); constant in the sequence.
TORCH_PATH_TILES = 13.4
FP32 = 4


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def gpus(self):
        return self.tp * self.cp * self.pp * self.dp

    @property
    def model_parallel(self):
        return self.tp * self.cp * self.pp

    def __str__(self):
        return f"TP{self.tp} CP{self.cp} PP{self.pp} DP{self.dp}"


@dataclass(frozen=True)
class Step:
    """How one training step runs: what the memory depends on besides the model and the layout."""

    seq_len: int
    micro_batch: int = 1
    recompute: bool = False  # full recompute: each layer keeps only its input, and reruns in backward
    sequence_parallel: bool = True  # Megatron's sequence parallelism, applied when TP > 1
    attention: str = "fused"  # "fused" (Triton, GPU), "torch" (block-wise, CPU) or "reference" (eager)
    cp_comm: str = "p2p"
    spec: str = "te"  # "te": Transformer Engine layers (GPU); "local": Megatron's own modules (CPU)
    activation_bytes: int = 2  # bf16 (4 for an fp32 run)
    grad_bytes: int = FP32  # the DDP grad buffer
    vocab_size: int = 128256  # LLaMA-3's tokenizer

    def __post_init__(self):
        for name, value, allowed in (("attention", self.attention, ATTENTION_PATHS), ("spec", self.spec, SPECS),
                                     ("cp_comm", self.cp_comm, CP_COMMS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is unknown; use one of {allowed}.")


@dataclass
class Memory:
    """Bytes on one GPU (the busiest pipeline stage)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    workspace: float
    peak_phase: str  # where the transient peak happens

    @property
    def model_state(self):
        return self.weights + self.grads + self.optimizer

    @property
    def total(self):
        return self.model_state + self.activations + self.workspace


def padded_vocab(vocab_size, tp):
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def _kv_width(model):
    return model.num_query_groups * model.head_dim


def layer_parameters(model, tp):
    """Parameters of one transformer layer on one TP rank: the linears are split, the two norms replicated."""
    h, kv, f = model.hidden_size, _kv_width(model), model.ffn_hidden_size
    linears = h * (h + 2 * kv) + h * h + 3 * h * f
    return linears // tp + 2 * h


def parameters_per_gpu(model, layout, vocab_size):
    """Parameters held by the busiest GPU: stage 0 (embedding) or the last stage (final norm, output layer)."""
    h = model.hidden_size
    layers = model.num_layers // layout.pp * layer_parameters(model, layout.tp)
    embedding = padded_vocab(vocab_size, layout.tp) * h // layout.tp
    # The output layer is its own matrix, or with tied embeddings a copy of the embedding on the last stage.
    output = embedding if (not model.tie_embeddings or layout.pp > 1) else 0
    if layout.pp == 1:
        return layers + embedding + h + output
    return max(layers + embedding, layers + h + output)


def model_state_bytes(params, layout, step):
    """(weights, grads, optimizer) bytes for `params` parameters on one GPU (Megatron's distributed optimizer)."""
    weight_bytes = step.activation_bytes  # bf16 weights in a bf16 run
    master = FP32 if weight_bytes < FP32 else 0  # fp32 master copy of bf16 weights
    grad_copy = FP32 if step.grad_bytes < FP32 else 0  # fp32 copy of a bf16 grad shard for the update
    optimizer = (master + 2 * FP32 + grad_copy) / (layout.dp * layout.cp)  # + Adam m and v
    return params * weight_bytes, params * step.grad_bytes, params * optimizer


def _sequence_split(layout, step):
    """Divisor of the hidden-size activations outside attention and MLP: TP with sequence parallelism."""
    return layout.tp if (step.sequence_parallel and layout.tp > 1) else 1


def _norm_items(where, h, layout, step):
    """RMSNorm and the input it hands to the next linear."""
    e, r = step.activation_bytes, _sequence_split(layout, step)
    if step.spec == "te":  # LayerNormLinear: input, normalised output (= the GEMM input), 1/rms
        return [(f"{where} norm input", h * e / r), (f"{where} norm output", h * e / r), (f"{where} 1/rms", FP32 / r)]
    # torch's RMSNorm computes in fp32: it keeps the input in fp32 (the input itself in an fp32 run),
    # x / rms in fp32 and 1/rms; the linear after it keeps the weighted output.
    return [(f"{where} norm input (fp32)", FP32 * h / r), (f"{where} normalised (fp32)", FP32 * h / r),
            (f"{where} 1/rms", FP32 / r), (f"{where} norm output", h * e / r)]


def _attention_items(model, layout, step):
    e, t = step.activation_bytes, layout.tp
    h, a, kv = model.hidden_size, model.num_attention_heads, _kv_width(model)
    groups_per_rank = model.num_query_groups // t
    # Megatron's fused QKV output is laid out per query group; reshaping the queries to heads copies
    # them unless a rank holds a single group. K and V stay views of the fused output.
    q_copy = [("Q (copied out of the grouped QKV)", h * e / t)] if groups_per_rank > 1 else []
    fused_qkv = ("fused QKV output (K, V are views of it)", (h + 2 * kv) * e / t)
    lse = ("log-sum-exp (fp32)", FP32 * a / t)
    if step.attention == "reference":
        if layout.cp > 1:
            raise ValueError("the reference attention is modelled at CP = 1 only (under CP the ring keeps no scores).")
        s = step.seq_len
        q_storage = q_copy or [fused_qkv]  # the score matmul keeps Q alive: its copy, or the fused output
        return q_storage + [
            ("K, V repeated to every query head", 2 * h * e / t),
            ("O (copied to [s, b, h])", h * e / t),
            ("log-sum-exp", a * e / t),
            ("empty-row flags", a / t),
            # amplitude, cos argument, cosine, masked scores, probabilities: (S, S) per head
            ("score matrices: 5 x heads x S", 5 * a / t * s * e),
            ("distance powers and causal mask: S", s * (e + 1)),
        ]
    ring = layout.cp > 1 and step.cp_comm == "p2p"
    if layout.cp > 1 and step.cp_comm == "all_gather":
        extra = [("gathered K, V of the whole sequence", 2 * kv * e / t * layout.cp),
                 ("gathered key positions", 8 * layout.cp)]
    elif layout.cp > 1 and step.cp_comm == "a2a":
        kv_heads = max(model.num_query_groups // t, layout.cp) * model.head_dim  # repeated up to CP heads
        extra = [("Q, K, V in the heads layout", (h + 2 * kv_heads) * e / t), ("O in the heads layout", h * e / t),
                 ("gathered positions", 16 * layout.cp)]
    else:
        extra = []
    # The ring keeps its merged output in the input dtype (its per-block partials are not kept); the
    # block-wise path keeps O in fp32, and a bf16 run copies it out for the output projection.
    out = [("O (= the output projection's input)", h * e / t)]
    if step.attention == "torch" and not ring:
        out = [("O (fp32)", FP32 * h / t)] + ([("O (copied to the input dtype)", h * e / t)] if e < FP32 else [])
    positions = [("token positions (int64, one tensor)", 8)] if ring else [("q and k positions (int64)", 16)]
    return q_copy + [fused_qkv] + out + [lse] + positions + extra


def _mlp_items(model, layout, step):
    e, t, f = step.activation_bytes, layout.tp, model.ffn_hidden_size
    # Megatron's unfused SwiGLU (bias_activation_fusion stays off): silu(gate) * (up + 0)
    return [("fc1 output (gate | up)", 2 * f * e / t), ("silu(gate)", f * e / t), ("up + glu offset", f * e / t),
            ("fc2 input", f * e / t)]


def layer_items(model, layout, step):
    """(name, bytes per local token) that autograd keeps for one transformer layer, without recompute."""
    h = model.hidden_size
    return (_norm_items("attention", h, layout, step) + _attention_items(model, layout, step)
            + _norm_items("MLP", h, layout, step) + _mlp_items(model, layout, step))


def _mlp_side_items(model, layout, step):
    """The layer's items after attention: freed by the time backward reaches the attention."""
    return _norm_items("MLP", model.hidden_size, layout, step) + _mlp_items(model, layout, step)


def loss_items(model, layout, step):
    """(name, bytes per local token) kept by the last stage's final norm, output layer and cross-entropy."""
    vocab = padded_vocab(step.vocab_size, layout.tp) // layout.tp
    return _norm_items("final", model.hidden_size, layout, step) + [
        ("softmax over the vocabulary (fp32)", FP32 * vocab),  # Megatron's cross-entropy runs in fp32
        ("target mask, target index, per-token loss", 1 + 8 + FP32),
    ]


def _total(items):
    return sum(size for _, size in items)


def local_tokens(layout, step):
    return step.micro_batch * step.seq_len // layout.cp


def attention_backward_bytes(model, layout, step):
    """Transient bytes of one layer's attention backward (gradients and the op's buffers), per GPU: the
    larger of the moment inside the op and the moment after it, when dQ, dK, dV are concatenated into
    the fused QKV gradient (dO and O are freed by then)."""
    e, t, n, b = step.activation_bytes, layout.tp, local_tokens(layout, step), step.micro_batch
    h, a, kv = model.hidden_size, model.num_attention_heads, _kv_width(model)
    residual_grad = n * h * e / _sequence_split(layout, step)
    d_out, d_qkv = n * h * e / t, n * (h + 2 * kv) * e / t
    if step.attention == "reference":
        own = n * 3 * a / t * step.seq_len * e  # gradients of the score matrices
    elif step.attention == "torch":
        # fp32 heads-first copies: dO, K and V repeated to the query heads, dQ/dK/dV, (Q and O in a bf16 run)
        copies = 5 + (2 if e < FP32 else 0)
        block = min(TORCH_PATH_BLOCK, n // b)
        own = n * (FP32 * h / t * copies + FP32 * a / t) + TORCH_PATH_TILES * b * a / t * block * block * FP32
    else:
        own = d_qkv + n * FP32 * a / t  # dQ, dK, dV and the row sums (delta)
    if layout.cp > 1 and step.cp_comm == "p2p":
        # fp32 dQ/dK/dV accumulators, the dK/dV arriving from the previous rank, the next K/V block
        own += n * (FP32 * (h + 2 * kv) / t + FP32 * 2 * kv / t + (2 * kv * e / t + 8))
    inside = residual_grad + d_out + own
    after = residual_grad + 2 * d_qkv - d_out  # O (the size of dO) is freed with the op's saved tensors
    return max(inside, after)


def mlp_backward_bytes(model, layout, step):
    """Transient bytes at the peak of one layer's MLP backward, per GPU: the residual gradient and, inside
    the SwiGLU product's backward, d(product), d(silu), d(up), less the fc2 input freed just before."""
    e, t, n = step.activation_bytes, layout.tp, local_tokens(layout, step)
    return n * (model.hidden_size * e / _sequence_split(layout, step) + 2 * model.ffn_hidden_size * e / t)


def loss_transient_bytes(model, layout, step):
    """Transient bytes around the loss on the last stage (the larger of its forward and backward moments)."""
    e, t, n, r = step.activation_bytes, layout.tp, local_tokens(layout, step), _sequence_split(layout, step)
    h, vocab = model.hidden_size, padded_vocab(step.vocab_size, layout.tp) // layout.tp
    logits = n * vocab * e if e < FP32 else 0  # the bf16 logits beside their fp32 copy
    # the decoder's output: kept by a TE norm, but with torch's norm only the fp32 copy is kept
    decoder_output = n * h * e / r if (step.spec == "local" and e < FP32) else 0
    forward = logits + decoder_output
    # backward: the hidden-state gradient and the output layer's weight gradient before it is added
    # to the grad buffer; by then a bf16 run has swapped the fp32 logit gradient for a bf16 one.
    swapped = n * vocab * (e - FP32) if e < FP32 else 0
    backward = n * h * e + vocab * h * e + swapped
    return max(forward, backward)


def memory_per_gpu(model, layout, step):
    """The `Memory` of the busiest GPU. Pipeline stage 0 holds PP micro-batches in flight (1F1B, at
    least PP micro-batches per step); the last stage holds one, plus the loss."""
    params = parameters_per_gpu(model, layout, step.vocab_size)
    weights, grads, optimizer = model_state_bytes(params, layout, step)
    n = local_tokens(layout, step)
    layers = model.num_layers // layout.pp
    per_layer = n * _total(layer_items(model, layout, step))
    kept_per_layer = n * model.hidden_size * step.activation_bytes / _sequence_split(layout, step) \
        if step.recompute else per_layer
    mlp_side = n * _total(_mlp_side_items(model, layout, step))
    loss = n * _total(loss_items(model, layout, step))
    attention_bwd = attention_backward_bytes(model, layout, step)
    recomputed = per_layer if step.recompute else 0  # the layer being recomputed in backward

    stages = [(layout.pp, layout.pp == 1)] + ([(1, True)] if layout.pp > 1 else [])  # (in flight, has loss)
    busiest = None
    for in_flight, has_loss in stages:
        stored = in_flight * layers * kept_per_layer + (loss if has_loss else 0)
        freed_loss = loss if has_loss else 0  # backward reaches the layers after the loss is freed
        phases = {"MLP backward": recomputed - freed_loss + mlp_backward_bytes(model, layout, step),
                  "attention backward": recomputed - freed_loss - mlp_side + attention_bwd}
        if has_loss:
            phases["loss"] = loss_transient_bytes(model, layout, step)
        phase, transient = max(phases.items(), key=lambda item: item[1])
        candidate = (stored, max(transient, 0.0), phase)
        if busiest is None or sum(candidate[:2]) > sum(busiest[:2]):
            busiest = candidate
    return Memory(weights, grads, optimizer, *busiest)
