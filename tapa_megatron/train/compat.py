"""What a resume or an extension loads must fit the run it loads into: the same model shape, the same
tokenizer (by the SHA-256 of its tokenizer.json's content, so a re-formatted copy is the same tokenizer)
and embedding rows, the same position scheme. A mismatch is one
RunError naming both sides and, where the run can go on deliberately, the override that accepts it
(checkpoint.allow_mismatch=[tokenizer], [position]). A shape or vocabulary mismatch has no override:
the weights do not fit (megatron would load a 1024-row embedding into a 512-row model by cutting it).

The trainer checks the checkpoint it is about to load; train/validate.py runs the same check before any
rank starts, and `tapa submit` checks each stage of a chain against the stage before it.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from megatron.core import dist_checkpointing

from tapa_megatron.config import to_dict
from tapa_megatron.model.config import RopeSettings, TapaSettings
from tapa_megatron.train import checkpoint
from tapa_megatron.train.errors import RunError

SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "tie_embeddings", "norm_epsilon")
ALLOWABLE = ("tokenizer", "position")
EMBEDDING = "embedding.word_embeddings.weight"
HF_SOURCE_TOKENIZER = Path("hf_source") / "tokenizer.json"  # kept by `tapa convert hf-to-megatron`


@dataclass
class Source:
    """What a run starts from: a checkpoint, or (for a chain not yet run) the stage before."""
    where: str
    config: dict  # its resolved run config
    identity: dict | None  # tokenizer_sha256, tokenizer_vocab_size, tokenizer_file, padded_vocab_size
    rows: int | None  # embedding rows


def tokenizer_hash(path):
    """SHA-256 of a tokenizer.json's content (vocabulary, merges, special tokens, settings), not of its bytes."""
    content = json.loads(Path(path).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def identity(tokenizer, padded_vocab_size):
    """What a checkpoint records about its tokenizer and vocabulary (save_checkpoint's identity)."""
    return {"tokenizer_sha256": tokenizer_hash(tokenizer.path), "tokenizer_vocab_size": tokenizer.vocab_size,
            "tokenizer_file": str(tokenizer.path), "padded_vocab_size": padded_vocab_size}


def from_checkpoint(path):
    """The Source a checkpoint describes, from its common state and tensor metadata (no weights read)."""
    path = Path(path)
    common = checkpoint.load_common(path)
    recorded = common.get("identity")
    hf_tokenizer = path / HF_SOURCE_TOKENIZER
    if recorded is None and hf_tokenizer.is_file():  # a converted checkpoint: the source model's tokenizer
        recorded = {"tokenizer_sha256": tokenizer_hash(hf_tokenizer),
                    "tokenizer_vocab_size": common["config"]["model"].get("vocab_size"),
                    "tokenizer_file": str(hf_tokenizer)}
    embedding = dist_checkpointing.load_tensors_metadata(str(path)).get(EMBEDDING)
    return Source(str(path), common["config"], recorded, embedding.global_shape[0] if embedding else None)


def from_plan(cfg, tokenizer, padded_vocab_size, where):
    """The Source a planned run (an earlier stage of a chain) will leave."""
    return Source(where, to_dict(cfg), identity(tokenizer, padded_vocab_size), padded_vocab_size)


def _position_settings(model):
    """The settings of the model's position scheme that change what it computes."""
    # Defaults first: a checkpoint saved before a setting existed ran with its default.
    if model["position"] == "tapa":
        settings = {**to_dict(TapaSettings()), **model["tapa"]}
        return {key: value for key, value in settings.items() if key not in ("backend", "phase_init_scale")}
    if model["position"] == "rope":
        return {**to_dict(RopeSettings()), **model["rope"]}
    return {}


def check(source, cfg, tokenizer, padded_vocab_size, kind):
    """Raise RunError if cfg cannot start from source; return warnings to print. kind: resume or extend."""
    saved, ours = source.config["model"], to_dict(cfg.model)
    allowed = set(cfg.checkpoint.allow_mismatch)
    verb = "resume from" if kind == "resume" else "start from"
    shape = [f"{key}: {saved.get(key)} in {source.where}, {ours[key]} here" for key in SHAPE_KEYS
             if saved.get(key) != ours[key]]
    if shape:
        fix = "; resume it with its own model settings, or train this model in another run_dir" if kind == "resume" \
            else "; give a checkpoint of this model shape, or change the recipe's model to the checkpoint's"
        raise RunError(f"cannot {verb} {source.where}: the model does not match ({'; '.join(shape)}){fix}.")

    problems, warnings = [], []
    if source.rows is not None and source.rows != padded_vocab_size:
        saved_tp = (source.config.get("parallel") or {}).get("tensor", 1)
        hint = f"set model.vocab_size={source.rows} to build its rows" if tokenizer.vocab_size <= source.rows \
            else f"its {source.rows} rows cannot hold this tokenizer's {tokenizer.vocab_size} ids: use its tokenizer"
        problems.append(f"its embedding has {source.rows} rows (saved at tensor parallel {saved_tp}), this run builds "
                        f"{padded_vocab_size} ({tokenizer.vocab_size} tokens in {tokenizer.path}, model.vocab_size="
                        f"{cfg.model.vocab_size}, padded for tensor parallel {cfg.parallel.tensor}), so loading would "
                        f"cut or leave rows; {hint}")
    recorded = source.identity or {}
    sha = tokenizer_hash(tokenizer.path)
    if recorded.get("tokenizer_sha256") not in (None, sha):
        mismatch = (f"it was trained with tokenizer {recorded.get('tokenizer_file')} (sha256 "
                    f"{recorded['tokenizer_sha256'][:12]}, {recorded.get('tokenizer_vocab_size')} tokens), this run "
                    f"has {tokenizer.path} (sha256 {sha[:12]}, {tokenizer.vocab_size} tokens)")
        if "tokenizer" in allowed:
            warnings.append(f"[{kind}] warning: {mismatch}; accepted (checkpoint.allow_mismatch has tokenizer)")
        else:
            problems.append(f"{mismatch}, so the same ids would stand for other text; pass "
                            "checkpoint.allow_mismatch=[tokenizer] to accept it deliberately")
    if saved["position"] != ours["position"] or _position_settings(saved) != _position_settings(ours):
        change = (f"position {saved['position']} {_position_settings(saved)} in {source.where}, "
                  f"{ours['position']} {_position_settings(ours)} here")
        if "position" in allowed:
            warnings.append(f"[{kind}] warning: {change}; accepted (checkpoint.allow_mismatch has position)")
        elif kind == "extend" and saved["position"] == ours["position"]:
            note = " (the paper extends TAPA with them unchanged)" if ours["position"] == "tapa" else ""
            warnings.append(f"[extend] {ours['position']} settings change: {change}{note}")
        else:
            problems.append(f"{change}; pass checkpoint.allow_mismatch=[position] to accept it deliberately")
    if problems:
        raise RunError(f"cannot {verb} {source.where}: " + "; ".join(problems) + ".")
    return warnings
