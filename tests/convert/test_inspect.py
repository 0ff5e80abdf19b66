"""`tapa convert inspect` on what the converters read and write."""

from tapa_megatron.cli import main
from tapa_megatron.convert import hf_to_megatron, megatron_to_hf
from tests.convert.tiny import tiny_llama


def test_inspect_converted_checkpoint_and_hf_directories(tmp_path, capsys):
    tiny_llama(tmp_path / "hf", tie_word_embeddings=True,
               rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    hf_to_megatron.convert(tmp_path / "hf", tmp_path / "ckpt", position="tapa", tensor_parallel=2)
    megatron_to_hf.convert(tmp_path / "ckpt", tmp_path / "tapa_hf")
    capsys.readouterr()

    main(["convert", "inspect", str(tmp_path / "ckpt")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "format    Megatron-Core dist checkpoint (torch_dist), written by tapa-megatron, complete"
    assert lines[2].startswith("model     2 layers, hidden 64, 4 heads / 2 key-value groups (head_dim 16), ffn 96, "
                               "vocab 200 (padded to 256), tied embeddings, 0.07M parameters")
    assert lines[3] == "position  tapa: alpha 0.1, theta 0.5 (8 amplitude + 8 phase dims per head), phase quadratic"
    assert lines[4].startswith("layout    run layout tensor 2, pipeline 1, context 1; written by 1 process; loads "
                               "at tensor parallel [1, 2]")
    assert lines[5] == "step      0 (0 samples consumed)"
    assert lines[6] == "contents  model weights (float32), no optimizer state"
    assert lines[7] == f"source    converted from llama at {tmp_path / 'hf'}"
    assert lines[8].startswith("size      ")

    main(["convert", "inspect", str(tmp_path / "hf")])
    text = capsys.readouterr().out
    assert "format    Hugging Face LlamaForCausalLM, safetensors in" in text
    assert "position  rope: theta 10000, linear x4.0" in text

    main(["convert", "inspect", str(tmp_path / "tapa_hf")])
    text = capsys.readouterr().out
    assert "Hugging Face TapaLlamaForCausalLM, safetensors in 1 file(s) (custom code: load with " \
           "trust_remote_code=True)" in text
    assert "position  tapa: alpha 0.1, theta 0.5" in text
