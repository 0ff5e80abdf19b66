"""A run's inputs, checked before any rank starts or any directory is created: the recipe's values, the
parallel layout against the world size, the data directory and its tokenizer, and what the run will
start from (the run's newest checkpoint, or checkpoint.init_from; train/compat.py). `tapa train`,
`tapa extend` and `tapa submit` call validate_run; what is wrong comes back as one RunError line
naming the key, the value and what would be accepted.
"""

import math
from pathlib import Path

from tapa_megatron.data.dataset import check_prepared
from tapa_megatron.data.tokenizer import load_tokenizer
from tapa_megatron.train import checkpoint, compat
from tapa_megatron.train.distributed import check_layout
from tapa_megatron.train.errors import RunError
from tapa_megatron.train.trainer import padded_vocab_size


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rules(cfg):
    """(key, value, acceptable, what is accepted) for every number a recipe holds."""
    t, o, c, d, m, p = cfg.training, cfg.optimizer, cfg.checkpoint, cfg.data, cfg.model, cfg.parallel
    counts = [("training.steps", t.steps, 1), ("training.global_batch_size", t.global_batch_size, 1),
              ("training.micro_batch_size", t.micro_batch_size, 1), ("training.log_every", t.log_every, 1),
              ("data.seq_length", d.seq_length, 1), ("parallel.tensor", p.tensor, 1),
              ("parallel.pipeline", p.pipeline, 1), ("parallel.context", p.context, 1),
              ("model.num_layers", m.num_layers, 1), ("model.hidden_size", m.hidden_size, 1),
              ("model.num_attention_heads", m.num_attention_heads, 1),
              ("model.num_query_groups", m.num_query_groups, 1), ("model.ffn_hidden_size", m.ffn_hidden_size, 1),
              ("checkpoint.save_every", c.save_every, 0), ("checkpoint.keep", c.keep, 0),
              ("optimizer.warmup_steps", o.warmup_steps, 0),
              ("training.skip_nonfinite_steps", t.skip_nonfinite_steps, 0)]
    rules = [(key, value, value >= least, "a whole number >= 1" if least else "0 or a whole number above")
             for key, value, least in counts]
    betas = o.betas
    rules += [
        ("training.exit_after_steps", t.exit_after_steps, t.exit_after_steps is None or t.exit_after_steps >= 1,
         "null (run to training.steps) or a whole number >= 1"),
        ("optimizer.lr", o.lr, _finite(o.lr) and o.lr >= 0, "a finite number >= 0"),
        ("optimizer.min_lr_ratio", o.min_lr_ratio, _finite(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1,
         "a fraction of optimizer.lr from 0 to 1"),
        ("optimizer.betas", betas, len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas),
         "two numbers in [0, 1), e.g. [0.9, 0.95]"),
        ("optimizer.eps", o.eps, _finite(o.eps) and o.eps > 0, "a finite number > 0"),
        ("optimizer.weight_decay", o.weight_decay, _finite(o.weight_decay) and o.weight_decay >= 0,
         "a finite number >= 0"),
        ("optimizer.clip_grad", o.clip_grad, _finite(o.clip_grad) and o.clip_grad >= 0,
         "0 (no clipping) or a finite norm > 0"),
        ("model.vocab_size", m.vocab_size, m.vocab_size is None or m.vocab_size >= 1,
         "null (the tokenizer's) or a whole number >= 1"),
        ("model.init_std", m.init_std, _finite(m.init_std) and m.init_std > 0, "a finite number > 0"),
        ("model.norm_epsilon", m.norm_epsilon, _finite(m.norm_epsilon) and m.norm_epsilon > 0, "a finite number > 0"),
        ("model.tapa.alpha", m.tapa.alpha, _finite(m.tapa.alpha) and m.tapa.alpha > 0, "a finite number > 0"),
        ("model.tapa.theta", m.tapa.theta, _finite(m.tapa.theta) and 0 < m.tapa.theta < 1, "a fraction in (0, 1)"),
        ("model.rope.base", m.rope.base, _finite(m.rope.base) and m.rope.base > 1, "a finite number > 1"),
        ("model.rope.factor", m.rope.factor, _finite(m.rope.factor) and m.rope.factor >= 1, "a finite number >= 1"),
        ("checkpoint.allow_mismatch", c.allow_mismatch, set(c.allow_mismatch) <= set(compat.ALLOWABLE),
         f"a list of {' and '.join(compat.ALLOWABLE)}, e.g. [tokenizer]"),
    ]
    return rules


def check_recipe(cfg):
    """The recipe's own values (no files read)."""
    wrong = [f"{key}={value!r} must be {accepted}" for key, value, ok, accepted in _rules(cfg) if not ok]
    if wrong:
        raise RunError("; ".join(wrong) + ".")


def check_model_layout(cfg, world_size, this_machine=True):
    """The layout against the world size and the model's shape. this_machine: also what this machine can
    run (check_layout; `tapa submit` for GPU nodes leaves that to the nodes)."""
    try:
        if this_machine:
            check_layout(cfg, world_size)
        else:
            cfg.data_parallel_size(world_size)
    except (ValueError, NotImplementedError) as err:
        raise RunError(str(err)) from None
    m, p = cfg.model, cfg.parallel
    splits = [("model.num_attention_heads", m.num_attention_heads, "parallel.tensor", p.tensor, "attention heads"),
              ("model.num_query_groups", m.num_query_groups, "parallel.tensor", p.tensor, "key-value groups"),
              ("model.ffn_hidden_size", m.ffn_hidden_size, "parallel.tensor", p.tensor, "MLP columns"),
              ("model.num_layers", m.num_layers, "parallel.pipeline", p.pipeline, "layers")]
    for key, value, parallel_key, size, what in splits:
        if value % size:
            raise RunError(f"{key}={value} is not divisible by {parallel_key}={size}: every rank needs a whole share "
                           f"of the {what}; use a {parallel_key} that divides {value}.")


def check_data(cfg):
    """data.path holds a prepared corpus whose tokenizer loads and matches it; returns the tokenizer."""
    path = cfg.data.path
    if not path:
        raise RunError("data.path is not set: give the directory `tapa data prepare --out DIR` wrote (data.path=DIR).")
    directory = Path(path)
    if not directory.is_dir():
        state = "is not a directory" if directory.exists() else f"does not exist (looked for {directory.absolute()})"
        raise RunError(f"data.path={path} {state}: prepare it with `tapa data prepare --out {path} ...`, or set "
                       "data.path to a directory that command wrote.")
    try:
        tokenizer = load_tokenizer(directory / "tokenizer.json")
    except FileNotFoundError:
        raise RunError(f"data.path={path} has no tokenizer.json: it was not written by `tapa data prepare` (or only "
                       "in part); prepare it again.") from None
    except Exception as err:  # the tokenizers library raises plain Exceptions for a file it cannot parse
        raise RunError(f"data.path={path}: its tokenizer.json does not load ({str(err).splitlines()[0]}); prepare "
                       "the directory again.") from None
    try:
        check_prepared(directory, tokenizer, cfg.data.split)
    except (FileNotFoundError, ValueError, AssertionError, OSError) as err:
        raise RunError(f"data.path={path}: {err}") from None
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tokenizer.vocab_size:
        raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.vocab_size} tokens of "
                       f"{tokenizer.path}: higher ids would index past the embedding; set it to at least "
                       f"{tokenizer.vocab_size}, or null (the tokenizer's).")
    return tokenizer


def _readable_latest(run_dir):
    """The newest complete checkpoint whose metadata reads, as a compat.Source; damaged ones are left to the
    trainer, which verifies them, reports them and falls back."""
    complete, _ = checkpoint.list_checkpoints(checkpoint.checkpoint_root(run_dir))
    for path in reversed(complete):
        try:
            return compat.from_checkpoint(path)
        except Exception:  # noqa: BLE001 - unreadable: the trainer's verification says what is wrong with it
            continue
    return None


def check_start(cfg, tokenizer, padded, previous=None):
    """What the run starts from fits it: its newest checkpoint (resume), else the previous stage of a chain or
    checkpoint.init_from (extension)."""
    if cfg.checkpoint.resume == "auto":
        latest = _readable_latest(cfg.run_dir)
        if latest is not None:
            return compat.check(latest, cfg, tokenizer, padded, "resume")
    if previous is not None:
        return compat.check(previous, cfg, tokenizer, padded, "extend")
    if cfg.checkpoint.init_from:
        try:
            source = checkpoint.resolve_checkpoint(cfg.checkpoint.init_from)
        except FileNotFoundError as err:
            raise RunError(f"checkpoint.init_from={cfg.checkpoint.init_from}: {err}") from None
        try:
            saved = compat.from_checkpoint(source)
        except Exception as err:  # noqa: BLE001 - a damaged file can fail to unpickle in many ways
            raise RunError(f"checkpoint.init_from={cfg.checkpoint.init_from}: {source} does not read ({err}); "
                           f"`tapa convert inspect --verify {source}` checks its files.") from None
        return compat.check(saved, cfg, tokenizer, padded, "extend")
    return []


def validate_run(cfg, world_size, this_machine=True, previous=None):
    """Everything above, in order; returns what the run will leave behind (a compat.Source), for the next
    stage of a chain. previous: the Source the run starts from when it is not on disk yet (a chain)."""
    check_recipe(cfg)
    check_model_layout(cfg, world_size, this_machine)
    tokenizer = check_data(cfg)
    padded = padded_vocab_size(cfg.model.vocab_size or tokenizer.vocab_size, cfg.parallel.tensor)
    check_start(cfg, tokenizer, padded, previous)
    return compat.from_plan(cfg, tokenizer, padded, where=f"stage {cfg.name!r} ({cfg.run_dir})")
