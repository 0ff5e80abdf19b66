"""`tapa convert inspect DIR`: what a checkpoint is, read from its metadata only (no weights loaded).

Understands our Megatron checkpoints (a checkpoint directory, or a run directory: its newest complete
checkpoint) and Hugging Face Llama / TapaLlama directories. With --verify, a Megatron checkpoint's files
are first checked against the sizes and SHA-256 sums in its completion marker (this reads every byte).
"""

import json
import math
from pathlib import Path

from tapa_megatron.convert import ConversionError, megatron_checkpoint
from tapa_megatron.convert.hf_files import SafetensorsWeights, read_config
from tapa_megatron.convert.hf_to_megatron import rope_parameters
from tapa_megatron.ops import amplitude_dim
from tapa_megatron.train import checkpoint
from tapa_megatron.train.trainer import padded_vocab_size


def _size(path):
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    unit = min(int(math.log(total, 1024)) if total else 0, 4)
    return f"{total / 1024**unit:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]} in {len(files)} files"


def _shape_row(layers, hidden, heads, groups, ffn, vocab, tied, parameters, padded=None):
    vocab_text = f"vocab {vocab}" + (f" (padded to {padded})" if padded and padded != vocab else "")
    return (f"{layers} layers, hidden {hidden}, {heads} heads / {groups} key-value groups (head_dim "
            f"{hidden // heads}), ffn {ffn}, {vocab_text}, {'tied' if tied else 'untied'} embeddings, "
            f"{parameters / 1e6:,.2f}M parameters")


def _tapa_row(alpha, theta, phase, head_dim):
    amplitude = amplitude_dim(head_dim, theta)
    return (f"tapa: alpha {alpha}, theta {theta} ({amplitude} amplitude + {head_dim - amplitude} phase dims per "
            f"head), phase {phase}")


def _loadable_tensor_parallel(m, vocab, padded):
    """Tensor-parallel sizes this checkpoint loads at: whole heads, groups and MLP columns per rank, and the
    trainer's vocabulary padding for that size equal to the stored one."""
    return [tp for tp in range(1, m.num_query_groups + 1)
            if m.num_query_groups % tp == 0 and m.num_attention_heads % tp == 0 and m.ffn_hidden_size % tp == 0
            and padded_vocab_size(vocab, tp) == padded]


def inspect_megatron(path):
    requested = Path(path)
    path, common, stored = megatron_checkpoint.read_checkpoint_info(requested)
    m = megatron_checkpoint.model_config_of(common, path)
    marker = json.loads((path / checkpoint.MARKER).read_text())
    embedding = stored[megatron_checkpoint.EMBEDDING]
    padded = embedding.global_shape[0]
    vocab = m.vocab_size or padded
    rows = [("path", str(path) + ("" if path == requested else f"  (newest complete checkpoint in {requested})")),
            ("format", "Megatron-Core dist checkpoint (torch_dist), written by tapa-megatron, complete"),
            ("model", _shape_row(m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
                                 m.ffn_hidden_size, vocab, m.tie_embeddings, m.num_parameters(vocab), padded))]
    if m.position == "tapa":
        rows.append(("position", _tapa_row(m.tapa.alpha, m.tapa.theta, m.tapa.phase, m.head_dim)))
    elif m.position == "none":
        rows.append(("position", "none (NoPE: causal softmax attention, no positional signal)"))
    else:
        r = m.rope
        scaling = "" if r.scaling == "none" else f", {r.scaling} x{r.factor} from {r.original_max_position}"
        rows.append(("position", f"rope: base {r.base:g}{scaling}"))
    parallel = common["config"].get("parallel") or {}
    writers = marker.get("world_size", "?")
    rows.append(("layout", f"run layout tensor {parallel.get('tensor', 1)}, pipeline {parallel.get('pipeline', 1)}, "
                           f"context {parallel.get('context', 1)}; written by {writers} "
                           f"process{'' if writers == 1 else 'es'}; loads at tensor parallel "
                           f"{_loadable_tensor_parallel(m, vocab, padded)} and any pipeline parallel size that "
                           f"divides its {m.num_layers} layers"))
    train_state = common.get("train_state") or {}
    rows.append(("step", f"{train_state.get('step', '?')} ({train_state.get('consumed_samples', '?')} samples "
                         "consumed)"))
    has_optimizer = any(key.startswith("optimizer.") for key in stored)
    rows.append(("contents", f"model weights ({str(embedding.dtype).removeprefix('torch.')})"
                             + (", optimizer state" if has_optimizer else ", no optimizer state")))
    conversion = common.get("conversion")
    if conversion:
        rows.append(("source", f"converted from {conversion['source_model_type']} at {conversion['source']}"))
    rows.append(("size", _size(path)))
    return rows


def inspect_hf(path):
    path = Path(path)
    hf = read_config(path)
    weights = SafetensorsWeights(path)
    parameters = sum(math.prod(weights.shape(name)) for name in weights.names())
    files = {weights.location[name] for name in weights.names()}
    architecture = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    custom = " (custom code: load with trust_remote_code=True)" if hf.get("auto_map") else ""
    heads = hf["num_attention_heads"]
    rows = [("path", str(path)),
            ("format", f"Hugging Face {architecture}, safetensors in {len(files)} file(s){custom}"),
            ("model", _shape_row(hf["num_hidden_layers"], hf["hidden_size"], heads,
                                 hf.get("num_key_value_heads") or heads, hf["intermediate_size"], hf["vocab_size"],
                                 hf.get("tie_word_embeddings", False), parameters))]
    if hf.get("model_type") == "tapa_llama":
        rows.append(("position", _tapa_row(hf["tapa_alpha"], hf["tapa_theta"], hf["tapa_phase"],
                                           hf["hidden_size"] // heads)))
    else:
        rope_type, theta, params = rope_parameters(hf)
        factor = f" x{params['factor']}" if params.get("factor") else ""
        rows.append(("position", f"rope: theta {theta:g}, {rope_type}{factor}"))
    rows.append(("contents", f"model weights ({hf.get('dtype') or hf.get('torch_dtype') or '?'}), context "
                             f"{hf.get('max_position_embeddings', '?')} (max_position_embeddings)"))
    rows.append(("size", _size(path)))
    return rows


def _verified_row(path):
    problems = checkpoint.verify(path)
    if problems:
        raise ConversionError(f"{path} is damaged: {'; '.join(problems)}. Resuming skips it for the newest "
                              "checkpoint that verifies; restore it from a copy, or move it away.")
    if problems is None:
        return ("verify", f"not possible: its {checkpoint.MARKER} holds no checksums (written by an earlier "
                          "tapa-megatron)")
    files = json.loads((path / checkpoint.MARKER).read_text())["files"]
    return ("verify", f"ok: all {len(files)} files match the sizes and SHA-256 sums in {checkpoint.MARKER}")


def inspect_path(path, verify=False):
    """Rows of (label, text) describing the checkpoint or model directory at path. verify: check a Megatron
    checkpoint's files first (ConversionError if they do not match)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist.")
    if (path / "config.json").is_file():
        return inspect_hf(path)
    try:
        found = checkpoint.resolve_checkpoint(path)
    except FileNotFoundError:
        if (path / "metadata.json").is_file():
            raise ConversionError(f"{path} is a Megatron dist checkpoint without tapa-megatron's completion marker "
                                  f"({checkpoint.MARKER}): unfinished, or written by another tool.") from None
        raise ConversionError(f"{path} is neither a Hugging Face model directory (config.json) nor a tapa-megatron "
                              "checkpoint or run directory.") from None
    verified = _verified_row(found) if verify else None
    return inspect_megatron(path) + ([verified] if verified else [])
