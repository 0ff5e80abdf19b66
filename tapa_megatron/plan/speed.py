"""Step time and MFU of a layout: the model's FLOPs at assumed achieved rates, plus the communication
that compute does not hide (formulas; no GPU is used).

A step of B sequences of S tokens on TP·CP·PP·DP GPUs runs m = B / (DP·b) micro-batches of b
sequences through PP stages, 1F1B (Megatron's schedule): the pipeline fills and drains in PP − 1
micro-batch slots. One micro-batch on the last stage (the busiest: it also holds the output layer),
with n = b·S/CP tokens per rank:

    matmuls    (6 + 2·recompute) x layers/PP x layer weights/TP x n, + 6 x V·h/TP x n for the output
               layer, at peak x matmul efficiency
    attention  (1 + 2.5 + recompute) x layers/PP x 2·(Hq/TP)·D·S x n, at the attention kernel's rate
               (causal: half of the (S, S) products; FlashAttention's backward is 2.5 forwards as it
               recomputes the scores)
    exposed    layers/PP x comm.exposed_seconds (TP collectives, ring transfers beyond ring compute),
               and with PP > 1 the stage-to-stage activation sends (b·S/CP·h, forward and backward)

    step = (m + PP − 1) x (micro-batch compute + exposed) + data-parallel exposed

Data parallel, as the trainer configures Megatron's DDP and distributed optimizer (over the DP x CP
group, g ranks): the fp32 gradients are reduce-scattered during the last micro-batch's backward
(overlap_grad_reduce), so only what exceeds that backward is exposed; the bf16 weights are all-gathered
after the optimizer step (overlap_param_gather is off), fully exposed. Each rank sends (g − 1)/g of its
stage's parameters in each.

MFU = model FLOPs of the step (`tapa_megatron.model.flops`: no recompute, causal half) / (step x GPUs x peak).

Not modelled: elementwise kernels (norms, SwiGLU, the loss), the optimizer's update, kernel launch
gaps and stragglers, collectives below their link's rate. The rates are assumptions until GPU runs
measure them; the estimate ranks layouts, it does not predict a run to the percent.
"""

from dataclasses import dataclass

from tapa_megatron.model.flops import layer_matmul_weights, training_flops_per_token
from tapa_megatron.plan.comm import ATTENTION_FLOPS, BACKWARD_FLOPS_RATIO, LINKS, MATMUL_EFFICIENCY, exposed_seconds
from tapa_megatron.plan.memory import FP32, padded_vocab, parameters_per_gpu


@dataclass(frozen=True)
class Rates:
    """What the estimate assumes of the hardware."""

    peak_flops: float  # dense bf16 FLOP/s of one GPU
    matmul_efficiency: float = MATMUL_EFFICIENCY
    attention_flops: float = ATTENTION_FLOPS  # achieved FLOP/s of the TAPA kernel (FlashAttention's count)
    gpus_per_node: int = 8


@dataclass(frozen=True)
class StepTime:
    """Seconds of one training step, term by term, and what they give."""

    micro_batches: int
    compute: float  # the last stage's matmuls and attention over the step's micro-batches
    exposed_comm: float  # TP, CP ring and stage-to-stage communication not hidden by compute
    bubble: float  # the pipeline's fill and drain: PP − 1 micro-batch slots
    data_parallel: float  # the gradient reduce-scatter beyond the last backward, and the weight all-gather
    tokens_per_second: float  # per GPU
    mfu: float

    @property
    def seconds(self):
        return self.compute + self.exposed_comm + self.bubble + self.data_parallel


def micro_batch_compute(model, layout, step, rates):
    """(forward, backward) seconds of one micro-batch's matmuls and attention on the last pipeline stage."""
    tokens = step.micro_batch * step.seq_len / layout.cp
    layers = model.num_layers // layout.pp
    layer_weights = layer_matmul_weights(model) / layout.tp
    output_weights = padded_vocab(step.vocab_size, layout.tp) * model.hidden_size / layout.tp
    matmul_rate = rates.peak_flops * rates.matmul_efficiency
    forward_matmul = 2 * (layers * layer_weights + output_weights) * tokens / matmul_rate
    backward_matmul = (4 + 2 * step.recompute) * layers * layer_weights * tokens / matmul_rate
    backward_matmul += 4 * output_weights * tokens / matmul_rate  # the output layer is not recomputed
    forward_attention = layers * 2 * (model.num_attention_heads / layout.tp) * model.head_dim * step.seq_len * tokens
    forward_attention /= rates.attention_flops
    backward_attention = (BACKWARD_FLOPS_RATIO + step.recompute) * forward_attention
    return forward_matmul + forward_attention, backward_matmul + backward_attention


def _link(ranks_spanned, gpus_per_node):
    return LINKS["NVLink"] if ranks_spanned <= gpus_per_node else LINKS["InfiniBand"]


def micro_batch_exposed(model, layout, step, rates):
    """Seconds of one micro-batch's communication on one stage that compute does not hide."""
    layers = model.num_layers // layout.pp
    exposed = layers * exposed_seconds(model, layout, step, rates.gpus_per_node, rates.attention_flops)
    if layout.pp > 1:  # activations to the next stage, their gradients back; Megatron does not overlap these
        activations = step.micro_batch * step.seq_len / layout.cp * model.hidden_size * step.activation_bytes
        exposed += 2 * activations / _link(layout.gpus, rates.gpus_per_node)
    return exposed


def data_parallel_seconds(model, layout, step, rates):
    """(gradient reduce-scatter, weight all-gather) seconds over the DP x CP group (Megatron orders ranks
    TP, CP, DP, PP: the group stays in a node while TP·CP·DP fits in one)."""
    group = layout.dp * layout.cp
    if group == 1:
        return 0.0, 0.0
    shard = (group - 1) / group * parameters_per_gpu(model, layout, step.vocab_size)
    bandwidth = _link(layout.tp * layout.cp * layout.dp, rates.gpus_per_node)
    return shard * FP32 / bandwidth, shard * 2 / bandwidth


def step_time(model, layout, step, global_batch, rates):
    """The StepTime of one step of `global_batch` sequences, or None when DP x micro-batch does not divide it."""
    if global_batch % (layout.dp * step.micro_batch):
        return None
    micro_batches = global_batch // (layout.dp * step.micro_batch)
    forward, backward = micro_batch_compute(model, layout, step, rates)
    exposed = micro_batch_exposed(model, layout, step, rates)
    reduce_scatter, all_gather = data_parallel_seconds(model, layout, step, rates)
    seconds_per_slot = forward + backward + exposed
    data_parallel = max(0.0, reduce_scatter - backward) + all_gather
    seconds = (micro_batches + layout.pp - 1) * seconds_per_slot + data_parallel
    tokens = global_batch * step.seq_len
    model_flops = tokens * training_flops_per_token(model, step.seq_len, step.vocab_size).total
    return StepTime(micro_batches=micro_batches, compute=micro_batches * (forward + backward),
                    exposed_comm=micro_batches * exposed, bubble=(layout.pp - 1) * seconds_per_slot,
                    data_parallel=data_parallel, tokens_per_second=tokens / seconds / layout.gpus,
                    mfu=model_flops / (seconds * layout.gpus * rates.peak_flops))
