"""Bad input is refused with a message naming the problem and the fix; output appears whole or not at all."""

import json
import shutil

import pytest

from tapa_megatron.cli import main
from tapa_megatron.convert import ConversionError, hf_files, hf_to_megatron, megatron_checkpoint, megatron_to_hf
from tests.convert.tiny import tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "hf"
    tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def tapa_checkpoint(hf_dir):
    out = hf_dir.parent / "tapa-ckpt"
    hf_to_megatron.convert(hf_dir, out, position="tapa")
    return out


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name or ".replaced" in p.name)


def broken_copy(hf_dir, tmp_path, damage):
    copy = tmp_path / "hf"
    shutil.copytree(hf_dir, copy)
    damage(copy)
    return copy


def shard(directory, number=2):
    return next(directory.glob(f"model-{number:05d}-of-*.safetensors"))


@pytest.mark.parametrize("damage,message", [
    (lambda d: shard(d).unlink(), r"names weight files that are missing: model-00002-of-\d+\.safetensors; "
                                  "the download is incomplete"),
    (lambda d: shard(d).write_bytes(shard(d).read_bytes()[:100]), "not a readable safetensors file .* truncated"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})),
     "model_type 'gpt2' .* only Llama-architecture models convert"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "num_hidden_layers": 3})),
     "parameters the config implies are missing .*model.layers.2"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json is not valid JSON"),
], ids=["missing-shard", "truncated-shard", "not-llama", "config-disagrees", "corrupt-config"])
def test_broken_hf_input_is_refused(hf_dir, tmp_path, damage, message):
    source = broken_copy(hf_dir, tmp_path, damage)
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron.convert(source, tmp_path / "out", position="rope")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_rope_variant_we_do_not_implement(hf_dir, tmp_path):
    def llama3_rope(d):
        config = json.loads((d / "config.json").read_text())
        config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
        (d / "config.json").write_text(json.dumps(config))

    source = broken_copy(hf_dir, tmp_path, llama3_rope)
    with pytest.raises(ConversionError, match="rope_type 'llama3' has no counterpart .* --position tapa"):
        hf_to_megatron.convert(source, tmp_path / "rope", position="rope")
    hf_to_megatron.convert(source, tmp_path / "tapa", position="tapa")  # TAPA replaces RoPE: fine


@pytest.mark.parametrize("tp,pp,message", [
    (3, 1, r"--tp 3 does not divide num_attention_heads=4: .* Use --tp in \[1, 2\]"),
    (4, 1, "--tp 4 does not divide num_key_value_heads=2"),
    (1, 4, "--pp 4 does not divide num_hidden_layers=2"),
], ids=["tp3", "tp4", "pp4"])
def test_layouts_the_model_does_not_split_into(hf_dir, tmp_path, tp, pp, message):
    with pytest.raises(ConversionError, match=message):
        hf_to_megatron.convert(hf_dir, tmp_path / "out", tensor_parallel=tp, pipeline_parallel=pp)


def test_existing_output_is_kept_unless_overwrite(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists; pass --overwrite"):
        hf_to_megatron.convert(hf_dir, out, position="rope")
    assert (out / "precious.txt").read_text() == "keep me"
    hf_to_megatron.convert(hf_dir, out, position="rope", overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "tapa_complete.json").is_file()
    assert not leftovers(tmp_path)


def test_output_over_the_input_is_refused(tapa_checkpoint):
    with pytest.raises(ConversionError, match="overlaps the input"):
        megatron_to_hf.convert(tapa_checkpoint, tapa_checkpoint / "hf", overwrite=True)


def test_tapa_checkpoint_is_not_exported_as_plain_llama(tapa_checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="is a TAPA model; LlamaForCausalLM applies RoPE .* --format tapa-llama"):
        megatron_to_hf.convert(tapa_checkpoint, tmp_path / "out", export_format="llama")
    assert not (tmp_path / "out").exists()


def test_crash_while_writing_leaves_nothing(hf_dir, tapa_checkpoint, tmp_path, monkeypatch):
    """A failure after some files are written (the disk fills, the job is killed) removes the partial
    directory; a previous output given --overwrite survives."""
    def fail_after_writing(model, path, common_state):
        (path / "__0_0.distcp").write_bytes(b"half a tensor")
        raise OSError("No space left on device")

    monkeypatch.setattr(megatron_checkpoint, "save_checkpoint", fail_after_writing)
    with pytest.raises(OSError, match="No space left"):
        hf_to_megatron.convert(hf_dir, tmp_path / "ckpt", position="rope")
    assert not (tmp_path / "ckpt").exists() and not leftovers(tmp_path)

    previous = tmp_path / "hf-out"
    previous.mkdir()
    (previous / "model.safetensors").write_text("the previous export")
    writes = []

    def fail_on_second_shard(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("No space left on device")
        real_save_file(tensors, path, metadata=metadata)

    real_save_file = hf_files.save_file
    monkeypatch.setattr(hf_files, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        megatron_to_hf.convert(tapa_checkpoint, previous, max_shard_bytes=50_000, overwrite=True)
    assert (previous / "model.safetensors").read_text() == "the previous export"
    assert not leftovers(tmp_path)


def test_command_line_reports_errors_without_a_traceback(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="tapa convert hf-to-megatron: .*--tp 3 does not divide"):
        main(["convert", "hf-to-megatron", "--hf", str(hf_dir), "--out", str(tmp_path / "x"), "--tp", "3"])
    with pytest.raises(SystemExit, match="tapa convert megatron-to-hf: No complete checkpoint at"):
        main(["convert", "megatron-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="tapa convert inspect: .* is neither a Hugging Face model directory"):
        main(["convert", "inspect", str(tmp_path)])


def test_nope_models_do_not_export():
    from tapa_megatron.model import ModelConfig

    for requested in megatron_to_hf.FORMATS:
        with pytest.raises(ConversionError, match="NoPE model .* does not export"):
            megatron_to_hf._export_format(ModelConfig(position="none"), requested, "runs/nope")
