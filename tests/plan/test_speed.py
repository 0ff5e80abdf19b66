"""Model FLOPs against torch's FLOP counter, and the step time / MFU estimate against a case worked by hand."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tapa_megatron.cli import main
from tapa_megatron.model import ModelConfig, build_gpt_model, transformer_config
from tapa_megatron.model.flops import matmul_weights, training_flops_per_token
from tapa_megatron.plan import Layout, Step
from tapa_megatron.plan.command import MATMUL_EFFICIENCY as COMMAND_DEFAULT
from tapa_megatron.plan.speed import MATMUL_EFFICIENCY, Rates, micro_batch_compute, step_time


def _counted(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_matmul_flops_equal_torch_flop_counter_on_a_real_model(megatron_single_rank, tie_embeddings):
    """Forward + backward of a Megatron GPTModel counted by torch: 6 x the matmul weights x tokens (the
    embedding lookup and norms count nothing), plus each layer's attention op as torch counts it alone."""
    cfg = ModelConfig(preset="tiny", tie_embeddings=tie_embeddings)
    vocab, batch, seq = 128, 2, 32
    torch.manual_seed(0)
    model = build_gpt_model(cfg, transformer_config(cfg), vocab_size=vocab, max_sequence_length=seq)
    tokens = torch.randint(0, vocab, (batch, seq))
    model_flops = _counted(lambda: model(tokens, None, None, labels=tokens).sum().backward())

    attention = model.decoder.layers[0].self_attention.core_attention
    q = torch.randn(seq, batch, cfg.num_attention_heads, cfg.head_dim, requires_grad=True)
    k, v = (torch.randn(seq, batch, cfg.num_query_groups, cfg.head_dim, requires_grad=True) for _ in range(2))
    attention_flops = _counted(lambda: attention(q, k, v, None).sum().backward())

    assert attention_flops > 0
    assert model_flops == 6 * matmul_weights(cfg, vocab) * batch * seq + cfg.num_layers * attention_flops
    assert training_flops_per_token(cfg, seq, vocab).matmul == 6 * matmul_weights(cfg, vocab)


def test_attention_flops_are_half_of_full_attention_as_torch_counts_it():
    """Causal attention's model FLOPs: half of eager full attention's forward + backward (no recompute)."""
    cfg = ModelConfig(preset="tiny")
    batch, seq, heads, dim = 1, 64, cfg.num_attention_heads, cfg.head_dim
    q, k, v = (torch.randn(batch, heads, seq, dim, requires_grad=True) for _ in range(3))
    full = _counted(lambda: ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward())
    per_token = training_flops_per_token(cfg, seq, vocab_size=0).attention
    assert per_token * batch * seq == cfg.num_layers * full / 2


def test_step_time_attention_is_flash_attentions_count():
    """The estimate times attention as FlashAttention runs it (backward recomputes the scores): torch's
    SDPA formulas, halved for causal, at the assumed rate."""
    cfg = ModelConfig(preset="8b")
    step, rates = Step(seq_len=8192), Rates(peak_flops=1e15, attention_flops=1e14)
    shape = (1, cfg.num_attention_heads, step.seq_len, cfg.head_dim)
    sdpa = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    no_attention = micro_batch_compute(cfg, Layout(), step, Rates(peak_flops=1e15, attention_flops=float("inf")))
    with_attention = micro_batch_compute(cfg, Layout(), step, rates)
    seconds = sum(with_attention) - sum(no_attention)
    assert seconds == pytest.approx(cfg.num_layers * sdpa / 2 / rates.attention_flops, rel=1e-12)


def test_step_time_worked_by_hand():
    """4 layers of 2^24 matmul weights (h 1024, 8 heads of 128, FFN 4096), vocab 1024, S 1024, micro-batch 1,
    global batch 8 on TP1 CP1 PP2 DP2: 4 micro-batches through 2 stages, peak 1e15 x 0.5, attention 2e14."""
    cfg = ModelConfig(preset="tiny", num_layers=4, hidden_size=1024, num_attention_heads=8, num_query_groups=8,
                      ffn_hidden_size=4096)
    step = Step(seq_len=1024, vocab_size=1024)
    rates = Rates(peak_flops=1e15, matmul_efficiency=0.5, attention_flops=2e14, gpus_per_node=8)
    speed = step_time(cfg, Layout(tp=1, cp=1, pp=2, dp=2), step, global_batch=8, rates=rates)

    # The last stage: 2 layers and the output layer (1024 x 1024), 1024 tokens per micro-batch.
    forward = 2 * (2 * 2**24 + 2**20) * 1024 / 5e14 + 2 * 2 * 8 * 128 * 1024 * 1024 / 2e14
    backward = 4 * (2 * 2**24 + 2**20) * 1024 / 5e14 + 2.5 * 2 * 2 * 8 * 128 * 1024 * 1024 / 2e14
    stage_send = 2 * 1024 * 1024 * 2 / 450e9  # bf16 activations forward, their gradients back, NVLink
    # The last stage's parameters: 2 layers with their two norms, the final norm, the output layer.
    params = 2 * (2**24 + 2 * 1024) + 1024 + 2**20
    reduce_scatter, all_gather = params / 2 * 4 / 450e9, params / 2 * 2 / 450e9
    assert reduce_scatter < backward  # hidden behind the last backward: only the all-gather is exposed
    slot = forward + backward + stage_send

    assert speed.micro_batches == 4
    assert speed.compute == pytest.approx(4 * (forward + backward), rel=1e-12)
    assert speed.exposed_comm == pytest.approx(4 * stage_send, rel=1e-12)
    assert speed.bubble == pytest.approx(slot, rel=1e-12)
    assert speed.data_parallel == pytest.approx(all_gather, rel=1e-12)
    assert speed.seconds == pytest.approx(5 * slot + all_gather, rel=1e-12)
    model_flops = 8 * 1024 * (6 * (4 * 2**24 + 1024 * 1024) + 6 * 4 * 1024 * 1024)
    assert speed.mfu == pytest.approx(model_flops / (speed.seconds * 4 * 1e15), rel=1e-12)
    assert speed.tokens_per_second == pytest.approx(8 * 1024 / speed.seconds / 4, rel=1e-12)


def test_step_time_orders_what_it_should():
    cfg, rates = ModelConfig(preset="8b"), Rates(peak_flops=989e12)
    step = Step(seq_len=32768)
    plain = step_time(cfg, Layout(tp=2, cp=4, dp=16), step, 128, rates)
    assert step_time(cfg, Layout(tp=2, cp=4, dp=16), Step(seq_len=32768, recompute=True), 128, rates).seconds > plain.seconds
    assert step_time(cfg, Layout(tp=2, cp=4, pp=2, dp=8), step, 128, rates).bubble > plain.bubble == 0
    assert step_time(cfg, Layout(tp=2, cp=4, dp=16), step, 100, rates) is None  # 16 does not divide 100
    assert 0 < plain.mfu < rates.matmul_efficiency
    assert MATMUL_EFFICIENCY == COMMAND_DEFAULT


def test_plan_prints_step_time_and_mfu_per_layout(capsys):
    main(["plan", "8b", "--seq-len", "32K", "--gpus", "16", "--gpu", "h200", "--global-batch", "32", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["gpu"] == "H200" and result["peak_tflops"] == 989.0 and result["global_batch"] == 32
    cfg, rates = ModelConfig(preset="8b"), Rates(peak_flops=989e12)
    for row in result["layouts"]:
        expected = step_time(cfg, Layout(row["tp"], row["cp"], row["pp"], row["dp"]), Step(seq_len=32768), 32, rates)
        assert row["step_s"] == pytest.approx(expected.seconds) and row["mfu"] == pytest.approx(expected.mfu)

    main(["plan", "8b", "--seq-len", "32K", "--gpus", "16", "--top", "2"])
    out = capsys.readouterr().out
    assert "step time at H100's 989 TFLOP/s dense bf16 peak" in out and "| step s | tokens/s/GPU | MFU |" in out
    assert "MFU: the step's model FLOPs over step time x GPUs x peak" in out
    with pytest.raises(SystemExit, match="--gpu V100 has no known peak; use one of H100, H200, A100, B200"):
        main(["plan", "8b", "--seq-len", "32K", "--gpus", "16", "--gpu", "v100"])


def test_a_recipe_fills_the_step_it_declares(capsys):
    """llama3-8b-32k-extend: 32K tokens, micro-batch 1, global batch 128, full recompute; flags still win."""
    main(["plan", "llama3-8b-32k-extend", "--gpus", "128", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["seq_len"], result["micro_batch"], result["global_batch"], result["recompute"]) == (32768, 1, 128, True)
    main(["plan", "llama3-8b-32k-extend", "--gpus", "128", "--seq-len", "16K", "--no-recompute", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["seq_len"], result["recompute"]) == (16384, False)
