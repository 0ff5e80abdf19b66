"""The Megatron-Core side: TAPA core attention inside GPTModel, the RoPE baselines, configs."""

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from tapa_megatron.model import (
    ModelConfig,
    SoftmaxCoreAttention,
    TapaCoreAttention,
    TapaSettings,
    build_gpt_model,
    gpt_layer_spec,
    transformer_config,
)
from tapa_megatron.model.rope import apply_rope, rope_inverse_frequencies, yarn_attention_scale
from tapa_megatron.ops import tapa_attention, tapa_attention_varlen


def tiny(**overrides):
    return ModelConfig(preset="tiny", **overrides)


def core_attention(cls, model):
    return cls(transformer_config(model), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_tapa_core_attention_equals_the_op():
    model = tiny(tapa=TapaSettings(alpha=0.2, theta=0.25, phase="linear"))
    attn = core_attention(TapaCoreAttention, model)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(24, 2, 4, 32, generator=gen)  # [s, b, heads, D], Megatron's layout
    k, v = torch.randn(24, 2, 2, 32, generator=gen), torch.randn(24, 2, 2, 32, generator=gen)
    out = attn(q, k, v, None)
    expected = tapa_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), alpha=0.2, theta=0.25,
                              phase="linear")
    assert out.shape == (24, 2, 128)
    torch.testing.assert_close(out, expected.transpose(0, 1).reshape(24, 2, 128), rtol=0, atol=0)


def _tapa_formula(q, k, v, *, alpha, amp_dim, phase, phase_scale):
    """Causal TAPA in float64 as the paper writes it, with the angle's factor free: q (S, H, D), k, v (S, H, D)."""
    qa, qp, ka, kp = q[..., :amp_dim], q[..., amp_dim:], k[..., :amp_dim], k[..., amp_dim:]
    amplitude = torch.einsum("mhd,nhd->hmn", qa, ka) / math.sqrt(amp_dim)
    if phase == "quadratic":
        phi = torch.einsum("mhd,nhd->hmn", qp, kp) / math.sqrt(qp.shape[-1])
    else:
        phi = (qp.sum(-1).T[:, :, None] + kp.sum(-1).T[:, None, :]) / math.sqrt(qp.shape[-1])
    positions = torch.arange(q.shape[0], dtype=torch.float64)
    distance = (positions[:, None] - positions[None, :]).abs()
    scores = amplitude * torch.cos(phase_scale * distance.pow(alpha) * phi)
    scores = scores.masked_fill(positions[None, :] > positions[:, None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v)


@pytest.mark.parametrize("phase", ["quadratic", "linear"])
@pytest.mark.parametrize("phase_scale", [1.0, 2 * math.pi, 20.0])
def test_tapa_phase_scale_sets_the_angle(phase, phase_scale):
    """model.tapa.phase_scale replaces the paper's 2 pi in cos(2 pi |m-n|^alpha phi) (oracle: the formula in
    float64), in the layer and in pair_scores (the distance-bias probe)."""
    model = tiny(tapa=TapaSettings(alpha=0.3, theta=0.5, phase=phase, phase_scale=phase_scale, backend="reference"))
    attn = core_attention(TapaCoreAttention, model)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(12, 1, 2, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    out = attn(q, k, v, None).reshape(12, 2, 32)
    expected = _tapa_formula(q[:, 0], k[:, 0], v[:, 0], alpha=0.3, amp_dim=16, phase=phase, phase_scale=phase_scale)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    pos = torch.tensor([7, 3])
    pair = attn.pair_scores(q[[0, 1], 0, 0], k[[0, 1], 0, 0], pos, torch.tensor([0, 0]))
    qp, kp = q[[0, 1], 0, 0, 16:], k[[0, 1], 0, 0, 16:]
    phi = (qp * kp).sum(-1) / 4 if phase == "quadratic" else (qp.sum(-1) + kp.sum(-1)) / 4
    amplitude = (q[[0, 1], 0, 0, :16] * k[[0, 1], 0, 0, :16]).sum(-1) / 4
    torch.testing.assert_close(pair, amplitude * torch.cos(phase_scale * pos.double().pow(0.3) * phi))


def test_tapa_core_attention_on_packed_documents():
    attn = core_attention(TapaCoreAttention, tiny())
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(30, 4, 32, generator=gen)  # 'thd': tokens, heads, D
    k, v = torch.randn(30, 2, 32, generator=gen), torch.randn(30, 2, 32, generator=gen)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=20, max_seqlen_kv=20)
    out = attn(q, k, v, None, packed_seq_params=packed)
    expected = tapa_attention_varlen(q, k, v, cu, cu, 20, 20)
    torch.testing.assert_close(out, expected.reshape(30, 128), rtol=0, atol=0)


def test_dense_masks_are_refused():
    attn = core_attention(TapaCoreAttention, tiny())
    q = torch.randn(4, 1, 4, 32)
    with pytest.raises(ValueError, match="create_attention_mask=False"):
        attn(q, q[:, :, :2], q[:, :, :2], torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_nope_core_attention_is_plain_causal_softmax():
    """NoPE: softmax(q k^T / sqrt(D)) v under the causal mask, no rotation, GQA; checked in float64."""
    attn = core_attention(SoftmaxCoreAttention, tiny(position="none"))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(12, 2, 4, 32, generator=gen, dtype=torch.float64)  # [s, b, heads, D]
    k, v = torch.randn(12, 2, 2, 32, generator=gen, dtype=torch.float64), torch.randn(12, 2, 2, 32, generator=gen,
                                                                                     dtype=torch.float64)
    out = attn(q, k, v, None).view(12, 2, 4, 32)
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)  # query head h reads group h // 2
    scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / math.sqrt(32)
    scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    pos = torch.tensor([0, 5, 900])  # pair scores carry no position: the same pair scores alike at any distance
    pair = attn.pair_scores(q[0, 0, :1].expand(3, -1), k[0, 0, :1].expand(3, -1), pos, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(pair, pair[0].expand(3))


def test_rope_matches_megatron_rotary_embedding(megatron_single_rank):
    """Our position-based RoPE (base 5e5, and PI x4) equals Megatron's RotaryEmbedding + apply_rotary_pos_emb."""
    x = torch.randn(16, 2, 4, 64, dtype=torch.float64).float()  # [s, b, h, D]
    config = transformer_config(tiny())
    for factor in (None, 4.0):
        rotary = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=500000,
                                 seq_len_interpolation_factor=factor, use_cpu_initialization=True)
        freqs = rotary.get_freqs_non_repeated(16)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        expected = apply_rotary_pos_emb(x, emb, config=config)
        inv_freq = rope_inverse_frequencies(64, 500000, "pi" if factor else "none", factor or 1.0)
        ours = apply_rope(x.transpose(0, 1), torch.arange(16).expand(2, 16), inv_freq).transpose(0, 1)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_yarn_frequencies():
    """High-frequency pairs keep RoPE's frequency, low-frequency pairs are divided by the factor,
    a linear ramp in between; q and k are scaled by 0.1 ln(s) + 1."""
    base_freq = rope_inverse_frequencies(128, 500000)
    yarn = rope_inverse_frequencies(128, 500000, "yarn", 8.0, original_max_position=8192)
    ratio = base_freq / yarn
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(8.0)
    assert torch.all(ratio[1:] >= ratio[:-1] - 1e-6)
    # the boundary dims follow the YaRN paper's formula for beta_fast = 32, beta_slow = 1 rotations
    wavelengths = 2 * math.pi / base_freq
    kept = 8192 / wavelengths > 32  # many turns within the original context
    interpolated = 8192 / wavelengths < 1  # less than one turn
    assert kept.any() and interpolated.any()
    assert torch.allclose(ratio[kept], torch.tensor(1.0)) and torch.allclose(ratio[interpolated], torch.tensor(8.0))
    assert yarn_attention_scale("yarn", 8.0) == pytest.approx(0.1 * math.log(8) + 1)


@pytest.mark.parametrize("position", ["tapa", "rope", "none"])
def test_gpt_model_forward_backward(megatron_single_rank, position):
    model_cfg = tiny(position=position)
    torch.manual_seed(0)
    model = build_gpt_model(model_cfg, transformer_config(model_cfg), vocab_size=97, max_sequence_length=64)
    layer = model.decoder.layers[0].self_attention.core_attention
    assert isinstance(layer, TapaCoreAttention if position == "tapa" else SoftmaxCoreAttention)
    tokens = torch.randint(0, 97, (2, 32))
    loss = model(tokens, None, None, labels=tokens)  # per-token losses [b, s]
    assert loss.shape == (2, 32)
    assert abs(loss.mean().item() - math.log(97)) < 0.5  # a fresh model is near uniform
    loss.mean().backward()
    params = list(model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params)


def test_tapa_model_has_no_position_parameters(megatron_single_rank):
    """TAPA adds no parameters: same count as the RoPE twin, and no position embedding table."""
    counts = {}
    for position in ("tapa", "rope", "none"):
        cfg = tiny(position=position)
        model = build_gpt_model(cfg, transformer_config(cfg), vocab_size=97, max_sequence_length=64)
        counts[position] = sum(p.numel() for p in model.parameters())
        assert not any("position_embeddings" in name for name, _ in model.named_parameters())
    assert counts["tapa"] == counts["rope"] == counts["none"] == tiny().num_parameters(97)


def test_spec_replaces_only_core_attention():
    spec = gpt_layer_spec("tapa", use_transformer_engine=False)
    assert spec.submodules.self_attention.submodules.core_attention is TapaCoreAttention
    with pytest.raises(ValueError, match="position='alibi' is unknown"):
        gpt_layer_spec("alibi")


@pytest.mark.parametrize("overrides,message", [
    (dict(preset="13b"), "model.preset='13b' is unknown"),
    (dict(position="alibi"), "model.position='alibi' is unknown"),
    (dict(num_attention_heads=3), "not divisible by num_attention_heads"),
    (dict(num_query_groups=3), "not divisible by num_query_groups"),
    (dict(tapa=TapaSettings(phase_scale=0.0)), "model.tapa.phase_scale=0.0 must be a finite number > 0"),
    (dict(tapa=TapaSettings(phase_init_scale=-1.0)), "model.tapa.phase_init_scale=-1.0 must be a finite number > 0"),
])
def test_model_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig(**overrides)


def test_presets_have_llama3_shapes():
    assert ModelConfig(preset="8b").num_parameters(128256) == pytest.approx(8.03e9, rel=0.01)
    assert ModelConfig(preset="70b").num_parameters(128256) == pytest.approx(70.6e9, rel=0.01)
    assert ModelConfig(preset="8b").head_dim == 128


@pytest.mark.parametrize("rope", [
    dict(), dict(base=2e8), dict(scaling="pi", factor=4.0), dict(scaling="yarn", factor=4.0, original_max_position=16),
    None,  # NoPE
])
def test_megatron_rotary_stack_equals_ours(megatron_single_rank, rope, monkeypatch):
    """The GPU baselines' stack: GPTModel's own RotaryEmbedding / YarnRotaryEmbedding, built from our config,
    and the spec's own core attention (Transformer Engine's on GPU). Its rotation of q and k, by
    Megatron's code (the embedding, apply_rotary_pos_emb and the YaRN temperature its Attention applies),
    equals our core attention's, in float64: plain RoPE, base 2e8, PI, YaRN; NoPE rotates nothing."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )

    from tapa_megatron.model import RopeSettings

    # Megatron's rotary embeddings move their frequencies to "the current CUDA device" on first use:
    # on this CPU machine that device is the CPU.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    model_cfg = tiny(position="none") if rope is None else tiny(position="rope", rope=RopeSettings(**rope))
    config = transformer_config(model_cfg)
    megatron = build_gpt_model(model_cfg, config, vocab_size=97, max_sequence_length=64, megatron_positions=True)
    assert not isinstance(megatron.decoder.layers[0].self_attention.core_attention, SoftmaxCoreAttention)
    ours = core_attention(SoftmaxCoreAttention, model_cfg)
    x = torch.randn(48, 2, 4, 32, dtype=torch.float64)  # [s, b, h, D]
    expected = ours._rotate(x.transpose(0, 1), torch.arange(48).expand(2, -1)).transpose(0, 1)
    if rope is None:
        assert not hasattr(megatron, "rotary_pos_emb") and torch.equal(expected, x)
        return
    emb = megatron.rotary_pos_emb(48)
    emb = emb[0] if isinstance(emb, tuple) else emb  # YaRN's returns (emb, its temperature); Attention uses the config's
    actual = apply_rotary_pos_emb(x, emb.double(), config=config, mscale=_yarn_get_concentration_factor_from_config(config))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)  # both take fp32 angles
