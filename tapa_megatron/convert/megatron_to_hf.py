"""`tapa convert megatron-to-hf`: a checkpoint of our model (saved at any TP/PP) -> a Hugging Face directory.

RoPE models export as the standard LlamaForCausalLM. TAPA models export as TapaLlama: its
configuration and modeling files are copied into the directory and named in config.json's auto_map,
so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it without tapa-megatron.
"""

import dataclasses
import shutil
from pathlib import Path

from transformers import GenerationConfig, LlamaConfig

from tapa_megatron.convert import ConversionError, mapping, megatron_checkpoint
from tapa_megatron.convert.configuration_tapa_llama import TapaLlamaConfig
from tapa_megatron.convert.hf_files import atomic_output_dir, copy_companions, refuse_overlap, write_weights
from tapa_megatron.convert.hf_to_megatron import DTYPES, HF_SOURCE_DIR, dims_of
from tapa_megatron.data.tokenizer import load_tokenizer

FORMATS = ("auto", "llama", "tapa-llama")
TAPA_LLAMA_FILES = ("configuration_tapa_llama.py", "modeling_tapa_llama.py")
AUTO_MAP = {"AutoConfig": "configuration_tapa_llama.TapaLlamaConfig",
            "AutoModelForCausalLM": "modeling_tapa_llama.TapaLlamaForCausalLM"}
ROPE_TYPES = {"none": "default", "pi": "linear", "yarn": "yarn"}  # our RoPE scaling -> HF rope_type
CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


def _export_format(model_cfg, requested, path):
    position = model_cfg.position
    if position == "none":
        raise ConversionError(f"{path} is a NoPE model (model.position=none), a training control; neither "
                              "LlamaForCausalLM (RoPE) nor TapaLlama computes its logits, so it does not export.")
    if requested == "auto":
        return "llama" if position == "rope" else "tapa-llama"
    if requested == "llama" and position == "tapa":
        raise ConversionError(f"{path} is a TAPA model; LlamaForCausalLM applies RoPE and would compute different "
                              "logits from these weights. Export with --format tapa-llama (the default for TAPA).")
    if requested == "tapa-llama" and position == "rope":
        raise ConversionError(f"{path} is a RoPE model; TapaLlama would compute different logits from these "
                              "weights. Export with --format llama (the default for RoPE), or convert to TAPA and "
                              "continue pretraining first.")
    return requested


def _vocab_size(model_cfg, common, padded, report):
    """The real vocabulary: the model config's, else the run's tokenizer's, else the padded size."""
    if model_cfg.vocab_size:
        return model_cfg.vocab_size
    data_path = (common["config"].get("data") or {}).get("path")
    tokenizer_file = Path(data_path or "") / "tokenizer.json"
    if data_path and tokenizer_file.is_file():
        return load_tokenizer(tokenizer_file).vocab_size
    report(f"[convert] vocabulary size unknown (model.vocab_size unset, no {tokenizer_file}); exporting all "
           f"{padded} padded rows")
    return padded


def _hf_config(model_cfg, export_format, vocab_size, dtype, common):
    """The transformers config object of the export."""
    m = model_cfg
    source = (common.get("conversion") or {}).get("source_config") or {}
    # The context the model is good for: the source model's, or the one the run trained at.
    max_positions = source.get("max_position_embeddings") or (common["config"].get("data") or {}).get("seq_length")
    fields = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_epsilon,
                  tie_word_embeddings=m.tie_embeddings, max_position_embeddings=max_positions or 8192, dtype=dtype,
                  **{key: source[key] for key in CARRIED_FIELDS if source.get(key) is not None})
    if export_format == "llama":
        rope = {"rope_type": ROPE_TYPES[m.rope.scaling], "rope_theta": m.rope.base}
        if m.rope.scaling != "none":
            rope["factor"] = m.rope.factor
        if m.rope.scaling == "yarn":
            rope["original_max_position_embeddings"] = m.rope.original_max_position
        return LlamaConfig(**fields, rope_parameters=rope, hidden_act="silu", attention_bias=False, mlp_bias=False,
                           head_dim=m.head_dim, architectures=["LlamaForCausalLM"])
    config = TapaLlamaConfig(**fields, tapa_alpha=m.tapa.alpha, tapa_theta=m.tapa.theta, tapa_phase=m.tapa.phase,
                             tapa_phase_scale=m.tapa.phase_scale, architectures=["TapaLlamaForCausalLM"])
    config.auto_map = dict(AUTO_MAP)
    return config


def _run_tokenizer(tokenizer, common):
    """The tokenizer to export: --tokenizer, else the run's (data.path, where `tapa data prepare` put it)."""
    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise ConversionError(f"--tokenizer {tokenizer} does not exist; give a Hugging Face tokenizer directory, "
                                  "a tokenizer.json or a SentencePiece .model.")
    else:
        data_path = (common["config"].get("data") or {}).get("path")
        tokenizer = Path(data_path or "") / "tokenizer.json"
        if not (data_path and tokenizer.is_file()):
            return None
    try:
        return load_tokenizer(tokenizer)
    except (OSError, ValueError) as err:
        raise ConversionError(f"--tokenizer {tokenizer}: {err}") from None


def convert(ckpt, out, *, export_format="auto", dtype="auto", tokenizer=None, max_shard_bytes=5 * 2**30,
            overwrite=False, report=print):
    """Export checkpoint `ckpt` (or a run directory's newest checkpoint) to the HF directory `out`."""
    if export_format not in FORMATS:
        raise ConversionError(f"--format {export_format!r} is unknown; use one of {FORMATS}.")
    out = Path(out)
    path, common, stored = megatron_checkpoint.read_checkpoint_info(ckpt)
    refuse_overlap(out, path)
    model_cfg = megatron_checkpoint.model_config_of(common, path)
    export_format = _export_format(model_cfg, export_format, path)
    run_tokenizer = _run_tokenizer(tokenizer, common)
    kept = path / HF_SOURCE_DIR
    embedding = stored[megatron_checkpoint.EMBEDDING]
    padded, stored_dtype = embedding.global_shape[0], embedding.dtype
    model_cfg = dataclasses.replace(model_cfg, vocab_size=_vocab_size(model_cfg, common, padded, report))
    vocab_size = model_cfg.vocab_size
    export_dtype = stored_dtype if dtype == "auto" else DTYPES[dtype]
    dims = dims_of(model_cfg, padded)
    config = _hf_config(model_cfg, export_format, vocab_size, export_dtype, common)
    if run_tokenizer is not None:  # the ids the model was trained with, not the source model's defaults
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            run_tokenizer.token_id(token) for token in
            (run_tokenizer.bos_token, run_tokenizer.eod_token, run_tokenizer.pad_token))

    with megatron_checkpoint.single_process_megatron(), atomic_output_dir(out, overwrite) as work:
        model = megatron_checkpoint.build_model(model_cfg, padded, stored_dtype)
        megatron_checkpoint.load_weights(model, path)
        state = model.state_dict()
        tensors = mapping.apply(mapping.MEGATRON_TO_HF, state.__getitem__, dims, model_cfg.num_layers,
                                model_cfg.tie_embeddings)
        write_weights(((name, tensor.to(export_dtype)) for name, tensor in tensors), work, max_shard_bytes)
        config.save_pretrained(work)
        if export_format == "tapa-llama":
            for name in TAPA_LLAMA_FILES:
                shutil.copy2(Path(__file__).with_name(name), work / name)
        copied = []
        if run_tokenizer is not None:
            run_tokenizer.save(work)
            copied = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
        elif kept.is_dir():
            copied = copy_companions(kept, work)
        if run_tokenizer is not None or "generation_config.json" not in copied:
            GenerationConfig.from_model_config(config).save_pretrained(work)
            copied.append("generation_config.json")
    kind = "LlamaForCausalLM" if export_format == "llama" else "TapaLlamaForCausalLM (trust_remote_code=True)"
    report(f"[convert] {path} ({model_cfg.position}, {model_cfg.num_layers} layers, vocab {vocab_size}) -> {out} "
           f"as {kind}, {str(export_dtype).removeprefix('torch.')}"
           + (f", with {', '.join(copied)}" if copied else ", no tokenizer files (the run's data.path has none: pass --tokenizer PATH)"))
    return out
