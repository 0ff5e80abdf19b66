"""The q/k/v row split (model/qkv.py) and grad norms by parameter group (grad_groups.py) against direct
computations on a tiny model: the q/k phase / amplitude and v rows are the ones Megatron's own
get_query_key_value_tensors routes there, the groups' squares sum to the engine's total grad norm,
recording them leaves training bit-identical, and model.tapa.phase_init_scale scales the phase rows only."""

import pytest
import torch

from tapa_megatron.config import load_config
from tapa_megatron.train import RunConfig

SEQ, VOCAB, SAMPLES = 16, 256, 4


def _cfg(*overrides):
    # 4 heads in 2 query groups (the tiny preset): the qkv rows interleave q1 q2 k v | q3 q4 k v.
    return load_config(RunConfig, None, [f"data.seq_length={SEQ}", f"training.global_batch_size={SAMPLES}",
                                         "training.micro_batch_size=2", "model.num_layers=2",
                                         "optimizer.lr=1e-2", *overrides])


def _batches():
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(3))
    return [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(2, SEQ)) for t in tokens.split(2)]


def _engine(cfg):
    from tapa_megatron.model import build_gpt_model, transformer_config
    from tapa_megatron.train.engine import PortableEngine

    torch.manual_seed(0)
    model = build_gpt_model(cfg.model, transformer_config(cfg.model), vocab_size=VOCAB, max_sequence_length=SEQ)
    return model, PortableEngine(model, cfg, (SEQ, 2, model.config.hidden_size), torch.float32)


def _megatron_rows(attention, amp_dim):
    """Which linear_qkv output rows Megatron's own split puts into q/k amplitude, q/k phase and v: the
    layer's output is replaced by each row's index and read back from the query, key and value it returns."""
    rows = attention.linear_qkv.weight.shape[0]
    hidden = torch.zeros(1, 1, attention.config.hidden_size)
    labels = torch.arange(rows, dtype=torch.float32).expand(1, 1, rows)
    hook = attention.linear_qkv.register_forward_hook(lambda module, args, output: (labels, output[1]))
    try:
        query, key, value = attention.get_query_key_value_tensors(hidden)[:3]
    finally:
        hook.remove()
    index = lambda t: t.reshape(-1).long().tolist()  # noqa: E731
    return {"qk amplitude": index(query[..., :amp_dim]) + index(key[..., :amp_dim]),
            "qk phase": index(query[..., amp_dim:]) + index(key[..., amp_dim:]), "v": index(value)}


@pytest.mark.parametrize("theta", [0.5, 0.25])
def test_phase_amplitude_split_is_megatrons_qkv_layout(megatron_single_rank, theta):
    cfg = _cfg("model.position=tapa", f"model.tapa.theta={theta}", "optimizer.clip_grad=0",
               "training.grad_norm_groups=true")
    model, engine = _engine(cfg)
    result = engine.train_step(_batches())  # no clipping: the grads left in the parameters are the step's
    amp_dim = int(theta * model.config.kv_channels)
    expected = dict.fromkeys(["qk amplitude", "qk phase", "v"], 0.0)
    for layer in model.decoder.layers:
        attention = layer.self_attention
        rows = _megatron_rows(attention, amp_dim)
        assert sorted(sum(rows.values(), [])) == list(range(attention.linear_qkv.weight.shape[0]))
        for group, indices in rows.items():
            expected[group] += attention.linear_qkv.weight.grad.double()[indices].square().sum().item()
    for group, square in expected.items():
        assert square > 0, group
        assert result.grad_norms[group] == pytest.approx(square ** 0.5, rel=1e-10), group
    embedding = model.embedding.word_embeddings.weight.grad.double().norm().item()
    assert result.grad_norms["embedding"] == pytest.approx(embedding, rel=1e-10)


@pytest.mark.parametrize("position", ["tapa", "rope", "none"])
def test_group_squares_sum_to_the_total_and_training_is_unchanged(megatron_single_rank, position):
    runs = {}
    for record in (False, True):
        cfg = _cfg(f"model.position={position}", f"training.grad_norm_groups={str(record).lower()}")
        model, engine = _engine(cfg)
        results = [engine.train_step(_batches()) for _ in range(3)]
        runs[record] = results, [p.detach().clone() for p in model.parameters()]
    (plain, plain_weights), (recorded, recorded_weights) = runs[False], runs[True]
    assert [(r.loss, r.grad_norm) for r in plain] == [(r.loss, r.grad_norm) for r in recorded]
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, recorded_weights))
    assert all(r.grad_norms is None for r in plain)
    qk_groups = {"qk phase", "qk amplitude"} if position == "tapa" else {"qk"}
    for r in recorded:
        assert set(r.grad_norms) == qk_groups | {"v", "attention out", "mlp", "embedding", "output layer", "norms"}
        assert sum(n ** 2 for n in r.grad_norms.values()) == pytest.approx(r.grad_norm ** 2, rel=1e-9)


def test_phase_init_scale_scales_the_phase_rows_only(megatron_single_rank):
    from tapa_megatron.model import build_gpt_model, transformer_config

    weights = {}
    for factor in (1.0, 0.25):
        cfg = _cfg("model.position=tapa", f"model.tapa.phase_init_scale={factor}")
        torch.manual_seed(0)
        model = build_gpt_model(cfg.model, transformer_config(cfg.model), vocab_size=VOCAB, max_sequence_length=SEQ)
        weights[factor] = model
    for plain, scaled in zip(weights[1.0].decoder.layers, weights[0.25].decoder.layers):
        rows = _megatron_rows(plain.self_attention, amp_dim=16)
        w, w_scaled = plain.self_attention.linear_qkv.weight, scaled.self_attention.linear_qkv.weight
        torch.testing.assert_close(w_scaled[rows["qk phase"]], 0.25 * w[rows["qk phase"]], rtol=0, atol=0)
        other = rows["qk amplitude"] + rows["v"]
        assert torch.equal(w_scaled[other], w[other])
    named = dict(weights[0.25].named_parameters())
    assert all(torch.equal(p, named[n]) for n, p in weights[1.0].named_parameters() if "linear_qkv" not in n)


def test_megatron_engine_refuses_grad_norm_groups():
    from tapa_megatron.train.engine import MegatronEngine

    with pytest.raises(ValueError, match="grad_norm_groups runs on the portable .CPU. engine only.*set it false"):
        MegatronEngine(None, _cfg("training.grad_norm_groups=true"), None, None)
