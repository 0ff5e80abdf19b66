"""HF Llama -> our Megatron model: same logits as transformers' own Llama; back to HF bitwise."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tapa_megatron.cli import main
from tapa_megatron.config import from_dict
from tapa_megatron.convert import hf_to_megatron, mapping, megatron_to_hf
from tapa_megatron.convert.hf_to_megatron import model_config_from_hf
from tapa_megatron.convert.megatron_checkpoint import build_model, single_process_megatron
from tapa_megatron.data.tokenizer import load_tokenizer, train_tokenizer
from tapa_megatron.train import RunConfig, checkpoint
from tests.convert.tiny import VOCAB, megatron_logits, tiny_llama, tokens


def read_safetensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("overrides", [
    dict(),  # grouped-query attention (4 heads, 2 groups), untied embeddings
    dict(num_key_value_heads=4, tie_word_embeddings=True),  # multi-head attention, tied embeddings
    dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),  # PI
    dict(rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                          "original_max_position_embeddings": 64}),
], ids=["gqa-untied", "mha-tied", "pi", "yarn"])
def test_rope_conversion_reproduces_the_hf_logits(tmp_path, overrides):
    hf_model = tiny_llama(tmp_path / "hf", **overrides)
    hf_to_megatron.convert(tmp_path / "hf", tmp_path / "ckpt", position="rope")
    ids = tokens()
    logits = megatron_logits(tmp_path / "ckpt", ids)
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert logits.shape == (2, 24, 256)  # vocabulary padded to a multiple of 128
    torch.testing.assert_close(logits[..., :VOCAB], expected, rtol=1e-5, atol=1e-5)
    assert torch.all(logits[..., VOCAB:] == 0)  # zero padding rows


def test_round_trip_is_bitwise(tmp_path, capsys):
    """bf16 shards -> Megatron (TP 2 padding) -> HF through the command line: every tensor identical,
    dtype kept, config, tokenizer and generation files carried, and transformers loads the result."""
    tiny_llama(tmp_path / "hf", dtype=torch.bfloat16)
    train_tokenizer(["a tokenizer travels with the model " * 20], tmp_path / "hf" / "tokenizer.json", vocab_size=300)
    main(["convert", "hf-to-megatron", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
          "--position", "rope", "--tp", "2"])
    main(["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
          "--max-shard-gb", str(50_000 / 2**30)])
    assert "vocab 200 padded to 256" in capsys.readouterr().out
    original, back = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor), name
    assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1
    source, exported = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", tmp_path / "back"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "bos_token_id",
                "eos_token_id", "max_position_embeddings", "dtype"):
        assert exported[key] == source[key], key
    for name in ("generation_config.json", "tokenizer.json"):  # kept in the checkpoint's hf_source/
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "back"), LlamaForCausalLM)


def test_the_checkpoint_is_a_trainer_starting_point(tmp_path):
    """What `checkpoint.init_from` needs: a complete checkpoint whose config loads as a RunConfig with the
    TAPA model and layout asked for, at step 0, weights only."""
    tiny_llama(tmp_path / "hf")
    hf_to_megatron.convert(tmp_path / "hf", tmp_path / "ckpt", position="tapa", tensor_parallel=2,
                           pipeline_parallel=2)
    assert checkpoint.resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt"
    common = checkpoint.load_common(tmp_path / "ckpt")
    cfg = from_dict(RunConfig, common["config"])
    assert (cfg.model.position, cfg.model.num_query_groups, cfg.model.vocab_size) == ("tapa", 2, VOCAB)
    assert (cfg.parallel.tensor, cfg.parallel.pipeline) == (2, 2)
    assert common["train_state"] == {"step": 0, "consumed_samples": 0}
    assert not (tmp_path / "ckpt" / "hf_source" / "tokenizer.json").exists()  # the tiny model has none
    assert (tmp_path / "ckpt" / "hf_source" / "generation_config.json").is_file()


@pytest.mark.parametrize("tied", [False, True])
def test_tables_name_every_parameter_of_both_models(tied):
    """The Megatron names in the tables are exactly our GPTModel's parameters, and mapping.hf_shapes is
    exactly transformers' LlamaForCausalLM: names and shapes."""
    hf_config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    hf_params = {name: tuple(p.shape) for name, p in LlamaForCausalLM(hf_config).named_parameters()}
    model_cfg = model_config_from_hf(hf_config.to_dict(), "test", "rope")
    dims = hf_to_megatron.dims_of(model_cfg, 256)
    assert mapping.hf_shapes(dims, 3, tied) == hf_params
    with single_process_megatron():
        megatron_params = {name for name, _ in build_model(model_cfg, 256, torch.float32).named_parameters()}
    zeros = {name: torch.zeros(shape) for name, shape in hf_params.items()}
    produced = dict(mapping.apply(mapping.HF_TO_MEGATRON, zeros.__getitem__, dims, 3, tied))
    assert produced.keys() == megatron_params
    back = dict(mapping.apply(mapping.MEGATRON_TO_HF, produced.__getitem__, dims, 3, tied))
    assert {name: tuple(t.shape) for name, t in back.items()} == hf_params


def _train(rank, world_size, cfg):
    from tapa_megatron.train import train

    return train(cfg).losses


def test_llama_to_tapa_training_to_hf(tmp_path, capfd):
    """The recipe end to end: a Llama whose vocabulary is the run's tokenizer's -> TAPA checkpoint ->
    `tapa train` with checkpoint.init_from -> TapaLlama export of the run directory. At lr 0 the training
    step leaves the weights alone, so the export must compute exactly the converted model's logits: the
    trainer loaded them (a fresh init would not), and the export found the vocabulary in the run's
    tokenizer (the run leaves model.vocab_size unset)."""
    from tapa_megatron.config import load_config
    from tapa_megatron.data.prepare import prepare
    from tests.distributed import run_ranks

    words = [f"w{i}" for i in range(40)]
    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        picks = torch.randint(0, len(words), (3000,), generator=gen).tolist()
        (tmp_path / f"{name}.txt").write_text(" ".join(words[i] for i in picks))
    vocab = prepare(tmp_path / "data", inputs=[tmp_path / "a.txt", tmp_path / "b.txt"], test_books=[],
                    vocab_size=300)["tokenizer"]["vocab_size"]
    tiny_llama(tmp_path / "hf", vocab_size=vocab)
    hf_to_megatron.convert(tmp_path / "hf", tmp_path / "ckpt", position="tapa")
    cfg = load_config(RunConfig, None, [
        f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data'}", "data.seq_length=32", "data.split=1,1,0",
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", "model.position=tapa", f"checkpoint.init_from={tmp_path / 'ckpt'}",
        "training.steps=1", "training.global_batch_size=2", "training.micro_batch_size=2",
        "training.tensorboard=false", "optimizer.lr=0", "optimizer.warmup_steps=0"])
    (losses,) = run_ranks(1, _train, cfg)
    assert f"[extend] starting from {tmp_path / 'ckpt'}" in capfd.readouterr().out
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0][1]))

    megatron_to_hf.convert(tmp_path / "run", tmp_path / "export")  # the tokenizer comes from the run's data.path
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    assert exported.config.vocab_size == vocab
    assert (tmp_path / "export" / "tokenizer.json").read_bytes() == (tmp_path / "data" / "tokenizer.json").read_bytes()
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    eod = load_tokenizer(tmp_path / "data" / "tokenizer.json").eod
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == eod
    assert exported.config.eos_token_id == exported.config.pad_token_id == exported.generation_config.eos_token_id == eod
    prompts = ["w1 w2 w3", "w4"]
    batch = hf_tokenizer(prompts, padding=True, return_tensors="pt")  # raised before: no pad token
    assert hf_tokenizer.padding_side == "left" and batch["attention_mask"].tolist()[1][0] == 0
    with torch.no_grad():  # a batch generates, row by row, what each prompt generates alone
        together = exported.generate(**batch, max_new_tokens=6, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = exported.generate(**hf_tokenizer(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False)
            assert together[row, -6:].tolist() == alone[0, -6:].tolist()
    ids = tokens(length=16) % vocab
    with torch.no_grad():
        logits = exported(ids).logits
    torch.testing.assert_close(logits, megatron_logits(tmp_path / "ckpt", ids)[..., :vocab], rtol=1e-5, atol=1e-5)
