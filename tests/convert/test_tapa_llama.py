"""The TAPA export: TapaLlama (transformers) computes our Megatron TAPA model's logits; its KV cache keeps
key positions, so incremental decoding equals a full forward pass; generate() works."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from tapa_megatron.convert import ConversionError, hf_to_megatron, megatron_to_hf
from tapa_megatron.convert.modeling_tapa_llama import CACHE_FIELD, register_auto_classes, tapa_attention
from tapa_megatron.model import TapaSettings
from tapa_megatron.ops import tapa_attention as tapa_op
from tests.convert.tiny import VOCAB, megatron_logits, tiny_llama, tokens


@pytest.fixture(scope="module")
def tapa_export(tmp_path_factory):
    """A tiny Llama converted to TAPA (alpha 0.2, theta 0.25, phase scale 1 rather than the paper's 2 pi), then
    exported: (checkpoint dir, HF dir)."""
    root = tmp_path_factory.mktemp("tapa")
    tiny_llama(root / "hf", tie_word_embeddings=True)
    settings = TapaSettings(alpha=0.2, theta=0.25, phase="quadratic", phase_scale=1.0)
    hf_to_megatron.convert(root / "hf", root / "ckpt", position="tapa", tapa=settings)
    megatron_to_hf.convert(root / "ckpt", root / "tapa_hf")
    return root / "ckpt", root / "tapa_hf"


@pytest.fixture(scope="module")
def tapa_model(tapa_export):
    return AutoModelForCausalLM.from_pretrained(tapa_export[1], trust_remote_code=True).eval()


@pytest.mark.parametrize("phase", ["quadratic", "linear"])
def test_modeling_file_attention_equals_the_op(phase):
    """The plain-PyTorch attention inside the exported modeling file against tapa_megatron.ops (float64
    reference), with GQA, positions far from 0, query blocks smaller than the sequence, and a padding mask
    (oracle: the op over the unmasked keys only)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 16, generator=gen, dtype=torch.float64)  # (B, H, Sq, D)
    k, v = (torch.randn(2, 2, 10, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(1000, 1010).expand(2, 10)
    ours = tapa_attention(q, k, v, positions, positions, alpha=0.1, amplitude_dim=8, phase=phase, query_block=3)
    expected = tapa_op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), alpha=0.1, theta=0.5, phase=phase,
                       q_pos=positions, k_pos=positions, backend="reference").transpose(1, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)

    keep = torch.tensor([0, 2, 3, 5, 6, 7, 9])  # queries at the kept keys; masked keys never seen
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, keep] = True
    masked = tapa_attention(q, k, v, positions, positions, mask, alpha=0.1, amplitude_dim=8, phase=phase)
    subset = tapa_op(q[:, :, keep].transpose(1, 2), k[:, :, keep].transpose(1, 2), v[:, :, keep].transpose(1, 2),
                     alpha=0.1, theta=0.5, phase=phase, q_pos=positions[:, keep], k_pos=positions[:, keep],
                     backend="reference").transpose(1, 2)
    torch.testing.assert_close(masked[:, :, keep], subset, rtol=1e-12, atol=1e-12)


def test_exported_tapa_llama_equals_our_megatron_model(tapa_export, tapa_model):
    ids = tokens()
    with torch.no_grad():
        logits = tapa_model(ids).logits
    torch.testing.assert_close(logits, megatron_logits(tapa_export[0], ids)[..., :VOCAB], rtol=1e-5, atol=1e-5)
    assert type(tapa_model).__module__.startswith("transformers_modules.")  # the code shipped in the directory
    config = AutoConfig.from_pretrained(tapa_export[1], trust_remote_code=True)
    assert (config.tapa_alpha, config.tapa_theta, config.tapa_phase_scale, config.tie_word_embeddings) == \
        (0.2, 0.25, 1.0, True)


def test_registered_auto_classes_load_without_remote_code(tapa_export, tapa_model):
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(tapa_export[1]).eval()
    assert type(model).__module__ == "tapa_megatron.convert.modeling_tapa_llama"
    ids = tokens(length=8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tapa_model(ids).logits)


def test_tapa_llama_export_converts_back(tapa_export, tmp_path):
    """TapaLlama -> Megatron again (e.g. to train it further): same TAPA settings, identical logits."""
    checkpoint_dir, hf_dir = tapa_export
    hf_to_megatron.convert(hf_dir, tmp_path / "again", position="tapa")
    ids = tokens()
    assert torch.equal(megatron_logits(tmp_path / "again", ids), megatron_logits(checkpoint_dir, ids))
    with pytest.raises(ConversionError, match="is a TAPA model .* --position tapa only"):
        hf_to_megatron.convert(hf_dir, tmp_path / "rope", position="rope")


def _decode_in_pieces(model, ids, positions, cuts):
    """Logits of ids fed in pieces [0, cuts[0]), [cuts[0], cuts[1]), ... through the cache."""
    cache, pieces = None, []
    for start, end in zip([0, *cuts], [*cuts, ids.shape[1]]):
        out = model(ids[:, start:end], position_ids=positions[:, start:end], cache=cache, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        pieces.append(out.logits)
    # the class from the exported directory's modeling file, not this package's
    assert type(cache).__name__ == "TapaCache" and cache.get_seq_length() == ids.shape[1]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("positions", ["contiguous", "jumps"])
def test_incremental_decoding_equals_a_full_forward(tapa_model, positions):
    """Prefill, single tokens, then a chunk. With jumps the positions are not the token indices, so a
    cache that forgot its keys' positions (and assumed 0, 1, 2, ...) would give different logits."""
    ids = tokens(length=16)
    pos = torch.arange(16).expand(2, 16)
    if positions == "jumps":
        pos = torch.cat([torch.arange(6), torch.arange(500, 510)]).expand(2, 16)
    with torch.no_grad():
        full = tapa_model(ids, position_ids=pos).logits
        incremental = _decode_in_pieces(tapa_model, ids, pos, cuts=[6, 7, 8, 12])
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


def test_generate_decodes_greedily_through_the_cache(tapa_model):
    prompt = tokens(batch=1, length=5)
    fed = []
    hook = tapa_model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(
        kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        generated = tapa_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    finally:
        hook.remove()
    assert fed == [5, 1, 1, 1, 1, 1]  # the prompt once, then one new token per step
    expected = prompt
    with torch.no_grad():
        for _ in range(6):  # greedy decoding by full forward passes, no cache
            expected = torch.cat([expected, tapa_model(expected, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, expected)


def test_generate_with_left_padding_equals_unpadded(tapa_model):
    """A batch with a left-padded row generates what that row generates alone: padding keys never attend."""
    short, long = tokens(batch=1, length=4, seed=3), tokens(batch=1, length=7, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    options = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = tapa_model.generate(batch, attention_mask=mask, **options)
    assert torch.equal(together[0, 3:], tapa_model.generate(short, **options)[0])
    assert torch.equal(together[1], tapa_model.generate(long, **options)[0])


def test_a_filled_cache_without_positions_is_refused(tapa_model):
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="only TapaCache keeps"):
        tapa_model(tokens(batch=1, length=2), cache=cache, use_cache=True)
