"""The memory and communication formulas on cases worked out by hand."""

import pytest

from tapa_megatron.model import ModelConfig
from tapa_megatron.ops import blockwise
from tapa_megatron.plan import Layout, Step, layer_items, memory_per_gpu, overlap_threshold, parameters_per_gpu, \
    ring_bytes
from tapa_megatron.plan.comm import tensor_parallel_bytes
from tapa_megatron.plan.memory import TORCH_PATH_BLOCK, model_state_bytes, padded_vocab

LLAMA3_VOCAB = 128256
EIGHT_B = ModelConfig(preset="8b")


def test_parameters_of_the_presets():
    assert parameters_per_gpu(EIGHT_B, Layout(), LLAMA3_VOCAB) == EIGHT_B.num_parameters(LLAMA3_VOCAB)
    assert parameters_per_gpu(EIGHT_B, Layout(), LLAMA3_VOCAB) == pytest.approx(8.03e9, rel=0.001)
    assert parameters_per_gpu(ModelConfig(preset="70b"), Layout(), LLAMA3_VOCAB) == pytest.approx(70.55e9, rel=0.001)


def test_parameters_split_over_tensor_and_pipeline_ranks():
    h, layers = 4096, 32
    per_layer = h * (h + 2 * 1024) + h * h + 3 * h * 14336  # QKV, output projection, SwiGLU MLP
    vocab = padded_vocab(LLAMA3_VOCAB, 8)
    assert vocab == 129024  # the trainer pads to a multiple of 128 x TP
    # TP 8, PP 4: 8 layers a stage; stage 0 adds the embedding, the last stage the output layer and final norm
    expected = layers // 4 * (per_layer // 8 + 2 * h) + vocab * h // 8 + h
    assert parameters_per_gpu(EIGHT_B, Layout(tp=8, pp=4), LLAMA3_VOCAB) == expected


@pytest.mark.parametrize("grad_bytes,optimizer_per_param", [(4, 12), (2, 16)])
def test_distributed_optimizer_is_sharded_over_data_and_context_ranks(grad_bytes, optimizer_per_param):
    params = 1_000_000
    weights, grads, optimizer = model_state_bytes(params, Layout(dp=4, cp=2), Step(seq_len=8, grad_bytes=grad_bytes))
    assert weights == 2 * params  # bf16
    assert grads == grad_bytes * params  # the DDP grad buffer, not sharded
    # fp32 master + Adam m + v (12 bytes), + an fp32 copy of a bf16 grad shard, over DP x CP = 8
    assert optimizer == optimizer_per_param * params / 8


def test_layer_activations_of_the_8b_model_by_hand():
    h, kv, f, heads = 4096, 8 * 128, 14336, 32
    e = 2  # bf16
    norms = 2 * (2 * h * e + 4)  # TE LayerNormLinear keeps input, output and 1/rms, twice a layer
    attention = (h + 2 * kv) * e + h * e + h * e + 4 * heads + 16  # fused QKV, Q copy, O, lse, positions
    mlp = 5 * f * e  # fc1 output (2f), silu, up + 0, fc2 input
    items = layer_items(EIGHT_B, Layout(), Step(seq_len=1024))
    assert sum(size for _, size in items) == norms + attention + mlp == 204952
    # TP 8 with sequence parallelism: everything split 8 ways, and a rank holding one KV group keeps Q as a view
    split = layer_items(EIGHT_B, Layout(tp=8), Step(seq_len=1024))
    assert sum(size for _, size in split) == (204952 - 16 - h * e) / 8 + 16


def test_activations_grow_linearly_with_the_fused_kernel_and_quadratically_with_the_reference():
    tiny = ModelConfig(preset="tiny")
    fused = [memory_per_gpu(EIGHT_B, Layout(tp=8, cp=8), Step(seq_len=s)).activations for s in (32768, 65536, 131072)]
    assert fused[1] == 2 * fused[0] and fused[2] == 4 * fused[0]
    reference = [memory_per_gpu(tiny, Layout(), Step(seq_len=s, attention="reference")).activations
                 for s in (1024, 2048, 4096)]
    per_token = [a / s for a, s in zip(reference, (1024, 2048, 4096))]
    assert per_token[1] - per_token[0] == pytest.approx((per_token[2] - per_token[1]) / 2)  # a*S + b per token
    score_bytes_per_token_per_key = tiny.num_layers * (5 * tiny.num_attention_heads * 2 + 3)  # 5 (S,S) per head
    assert (per_token[1] - per_token[0]) / 1024 == pytest.approx(score_bytes_per_token_per_key)


def test_full_recompute_keeps_only_each_layer_input():
    step, layout = Step(seq_len=65536, recompute=True), Layout(tp=8, cp=4)
    memory = memory_per_gpu(EIGHT_B, layout, step)
    tokens = 65536 // 4
    loss = tokens * (4 * padded_vocab(LLAMA3_VOCAB, 8) / 8 + 13 + (2 * 4096 * 2 + 4) / 8)
    assert memory.activations == pytest.approx(32 * tokens * 4096 * 2 / 8 + loss)
    # the recomputed layer lives in the workspace
    full = memory_per_gpu(EIGHT_B, layout, Step(seq_len=65536))
    assert memory.workspace > tokens * 204952 / 8 / 2 and memory.total < full.total


def test_ring_volume_and_overlap_threshold():
    step = Step(seq_len=131072)
    forward, backward = ring_bytes(EIGHT_B, Layout(cp=8), step)
    block = 2 * 16384 * 1024 * 2 + 8 * 16384  # K and V of 16K tokens x 8 heads x 128 dims in bf16, positions
    assert forward == 7 * block
    assert backward == 7 * block + 8 * 2 * 16384 * 1024 * 4  # K/V again, and fp32 dK/dV for CP hops
    assert ring_bytes(EIGHT_B, Layout(), step) == (0.0, 0.0)
    # hidden when S/CP >= e F / (g BW): 2 * 300e12 / (4 * 450e9)
    assert overlap_threshold(EIGHT_B, 2, 450e9, 300e12) == pytest.approx(333.33, rel=1e-4)


def test_tensor_parallel_volume():
    # 4 collectives forward, 4 backward, each rank sending 7/8 of 16K tokens x 4096 x bf16
    assert tensor_parallel_bytes(EIGHT_B, Layout(tp=8, cp=8), Step(seq_len=131072)) == 8 * 7 / 8 * 16384 * 4096 * 2


def test_constants_follow_the_code():
    assert TORCH_PATH_BLOCK == blockwise.DEFAULT_BLOCK


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="attention='flash' is unknown"):
        Step(seq_len=8, attention="flash")
    with pytest.raises(ValueError, match="reference attention is modelled at CP = 1"):
        memory_per_gpu(EIGHT_B, Layout(cp=2), Step(seq_len=8, attention="reference"))
