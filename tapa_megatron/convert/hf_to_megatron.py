"""`tapa convert hf-to-megatron`: a Hugging Face Llama directory -> a checkpoint of our Megatron model.

With --position rope the result is the same RoPE model (the baseline, and the proof that the mapping
is right: its logits equal the HF model's). With --position tapa it is a TAPA model initialised from
the RoPE model's weights, the starting point for continued pretraining with TAPA.

The output is a checkpoint directory in the trainer's layout (train/checkpoint.py) at step 0 with
model weights only: use it as `checkpoint.init_from` of a run. The tokenizer and generation files of
the source are kept in its hf_source/ folder for the way back (megatron-to-hf).
"""

from pathlib import Path

import torch

from tapa_megatron.config import to_dict
from tapa_megatron.convert import ConversionError, mapping, megatron_checkpoint
from tapa_megatron.convert.hf_files import (
    SafetensorsWeights,
    atomic_output_dir,
    copy_companions,
    read_config,
    refuse_overlap,
)
from tapa_megatron.model import PRESETS, ModelConfig, RopeSettings, TapaSettings
from tapa_megatron.train import RunConfig
from tapa_megatron.train.config import ParallelConfig
from tapa_megatron.train.trainer import padded_vocab_size

HF_SOURCE_DIR = "hf_source"  # inside the checkpoint: the source's tokenizer and generation files
SOURCE_MODEL_TYPES = ("llama", "tapa_llama")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some older checkpoints saved with the weights; recomputed by every model, never converted.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# HF rope_type -> our RoPE scaling (model/rope.py)
ROPE_SCALINGS = {"default": "none", "linear": "pi", "yarn": "yarn"}


def rope_parameters(hf):
    """(rope_type, theta, parameters) from either config format: transformers 5's rope_parameters or the
    older rope_theta + rope_scaling."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    return rope_type, float(params.get("rope_theta", hf.get("rope_theta", 10000.0))), params


def _rope_settings(hf, where):
    """Our RopeSettings for a --position rope conversion; RoPE variants we do not implement are refused."""
    rope_type, theta, params = rope_parameters(hf)
    if rope_type not in ROPE_SCALINGS:
        raise ConversionError(f"{where}: rope_type {rope_type!r} has no counterpart in our RoPE baselines (plain, "
                              f"linear/PI, YaRN), so --position rope cannot reproduce this model. Convert with "
                              "--position tapa (RoPE is replaced anyway), or add the variant to model/rope.py.")
    scaling = ROPE_SCALINGS[rope_type]
    if scaling == "none":
        return RopeSettings(base=theta, scaling="none")
    if not params.get("factor"):
        raise ConversionError(f"{where}: rope_type {rope_type!r} without a 'factor'; the RoPE settings are incomplete.")
    factor = float(params["factor"])
    original = int(params.get("original_max_position_embeddings") or _require(hf, "max_position_embeddings", where))
    if scaling == "yarn":
        custom = {k: params[k] for k in ("attention_factor", "mscale", "mscale_all_dim") if params.get(k)}
        custom.update({k: params[k] for k, default in (("beta_fast", 32), ("beta_slow", 1), ("truncate", True))
                       if params.get(k, default) != default})
        if custom:
            raise ConversionError(f"{where}: YaRN settings {custom} differ from the paper's defaults that "
                                  "model/rope.py implements; convert with --position tapa instead.")
    return RopeSettings(base=theta, scaling=scaling, factor=factor, original_max_position=original)


def _require(hf, key, where):
    if key not in hf:
        raise ConversionError(f"{where} has no {key!r}, which every Llama config.json has; the file is incomplete "
                              "or not a model config.")
    return hf[key]


def model_config_from_hf(hf, where, position, tapa=None):
    """Our ModelConfig for HF config dict `hf`. tapa: a TapaSettings for a TAPA conversion of a Llama
    (None: the defaults); a TapaLlama source brings its own."""
    model_type = hf.get("model_type")
    if model_type not in SOURCE_MODEL_TYPES:
        raise ConversionError(f"{where} describes model_type {model_type!r} (architectures "
                              f"{hf.get('architectures')}); only Llama-architecture models convert: model_type "
                              "'llama', or 'tapa_llama' as exported by `tapa convert megatron-to-hf`.")
    hidden, heads = _require(hf, "hidden_size", where), _require(hf, "num_attention_heads", where)
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, expected) != expected:
            raise ConversionError(f"{where}: {key}={hf[key]!r}, but our model is Llama with {key}={expected!r}; "
                                  "this checkpoint cannot be represented.")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads "
                              f"= {hidden // heads}; our model derives head_dim from those two.")
    if model_type == "tapa_llama":
        if position != "tapa":
            raise ConversionError(f"{where} is a TAPA model (tapa_llama); it converts with --position tapa only.")
        trained = TapaSettings(alpha=hf["tapa_alpha"], theta=hf["tapa_theta"], phase=hf["tapa_phase"],
                               phase_scale=hf.get("tapa_phase_scale", TapaSettings.phase_scale))
        if tapa is not None and tapa != trained:
            raise ConversionError(f"{where}: the model was trained with TAPA {trained}; the --tapa-* options "
                                  "apply to Llama sources only, leave them out.")
        tapa = trained
    shape = dict(num_layers=_require(hf, "num_hidden_layers", where), hidden_size=hidden, num_attention_heads=heads,
                 num_query_groups=hf.get("num_key_value_heads") or heads,
                 ffn_hidden_size=_require(hf, "intermediate_size", where))
    # The preset only fills fields left unset; every shape field here is explicit.
    preset = next((name for name, values in PRESETS.items() if values == shape), "tiny")
    try:
        return ModelConfig(preset=preset, **shape, vocab_size=_require(hf, "vocab_size", where),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                           norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), position=position,
                           tapa=tapa or TapaSettings(),
                           rope=_rope_settings(hf, where) if position == "rope" else RopeSettings())
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from None


def check_layout(model_cfg, tensor_parallel, pipeline_parallel):
    """Refuse a target layout the model does not split into."""
    m, tp = model_cfg, tensor_parallel
    if tp < 1 or pipeline_parallel < 1:
        raise ConversionError(f"--tp {tp} --pp {pipeline_parallel}: both must be >= 1.")
    for name, value in (("num_attention_heads", m.num_attention_heads), ("num_key_value_heads", m.num_query_groups),
                        ("intermediate_size", m.ffn_hidden_size)):
        if value % tp:
            options = [n for n in range(1, m.num_query_groups + 1) if m.num_query_groups % n == 0
                       and m.num_attention_heads % n == 0 and m.ffn_hidden_size % n == 0]
            raise ConversionError(f"--tp {tp} does not divide {name}={value}: every tensor-parallel rank needs whole "
                                  f"heads, key/value groups and MLP columns. Use --tp in {options}.")
    if m.num_layers % pipeline_parallel:
        raise ConversionError(f"--pp {pipeline_parallel} does not divide num_hidden_layers={m.num_layers}; "
                              "pipeline stages need equal numbers of layers.")


def dims_of(model_cfg, padded_vocab_size):
    m = model_cfg
    return mapping.Dims(hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                        num_query_groups=m.num_query_groups, head_dim=m.head_dim, ffn_hidden_size=m.ffn_hidden_size,
                        vocab_size=m.vocab_size, padded_vocab_size=padded_vocab_size)


def check_weights(weights, dims, model_cfg, where):
    """Every parameter the config implies is there with its shape, and nothing else is."""
    expected = mapping.hf_shapes(dims, model_cfg.num_layers, model_cfg.tie_embeddings)
    missing = [name for name in expected if name not in weights.names()]
    if missing:
        raise ConversionError(f"{where}: {len(missing)} parameters the config implies are missing (first: "
                              f"{missing[0]}); the weights are incomplete or belong to another model.")
    wrong = [(name, weights.shape(name), shape) for name, shape in expected.items() if weights.shape(name) != shape]
    if wrong:
        name, found, shape = wrong[0]
        raise ConversionError(f"{where}: {name} has shape {found} but config.json implies {shape}; the weights and "
                              "config.json do not belong together.")
    tied_copy = {"lm_head.weight"} if model_cfg.tie_embeddings else set()
    unexpected = [name for name in weights.names()
                  if name not in expected and name not in tied_copy and not name.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise ConversionError(f"{where}: {len(unexpected)} tensors have no place in a Llama (first: {unexpected[0]}); "
                              "biases, adapters or another architecture cannot be converted.")


def convert(hf_dir, out, *, position="tapa", tensor_parallel=1, pipeline_parallel=1, dtype="auto", tapa=None,
            overwrite=False, report=print):
    """Convert the HF model in hf_dir into a checkpoint directory `out`. Returns out."""
    hf_dir, out = Path(hf_dir), Path(out)
    refuse_overlap(out, hf_dir)
    hf = read_config(hf_dir)
    where = str(hf_dir / "config.json")
    model_cfg = model_config_from_hf(hf, where, position, tapa)
    check_layout(model_cfg, tensor_parallel, pipeline_parallel)
    padded = padded_vocab_size(model_cfg.vocab_size, tensor_parallel)
    dims = dims_of(model_cfg, padded)
    weights = SafetensorsWeights(hf_dir)
    check_weights(weights, dims, model_cfg, str(hf_dir))
    if dtype == "auto":
        stored = weights.dtype("model.embed_tokens.weight")
        if stored not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{hf_dir}: weights are stored as {stored}; pass --dtype float32 or bfloat16.")
        torch_dtype = SAFETENSORS_DTYPES[stored]
    else:
        torch_dtype = DTYPES[dtype]

    run = RunConfig(name=f"{hf_dir.name}-{position}", model=model_cfg,
                    parallel=ParallelConfig(tensor=tensor_parallel, pipeline=pipeline_parallel),
                    description=f"converted from the Hugging Face model {hf_dir.resolve()} by tapa convert "
                                f"hf-to-megatron --position {position}")
    common = {"config": to_dict(run), "train_state": {"step": 0, "consumed_samples": 0},
              "conversion": {"source": str(hf_dir.resolve()), "source_model_type": hf["model_type"],
                             "source_config": hf, "position": position}}
    with megatron_checkpoint.single_process_megatron(), atomic_output_dir(out, overwrite) as work:
        model = megatron_checkpoint.build_model(model_cfg, padded, torch_dtype)
        targets = {name: t for name, t in model.state_dict().items() if not name.endswith("_extra_state")}
        for name, tensor in mapping.apply(mapping.HF_TO_MEGATRON, weights.__getitem__, dims, model_cfg.num_layers,
                                          model_cfg.tie_embeddings):
            targets.pop(name).copy_(tensor)
        if targets:
            raise AssertionError(f"mapping.HF_TO_MEGATRON leaves Megatron parameters unset: {sorted(targets)}")
        megatron_checkpoint.save_checkpoint(model, work, common)
        (work / HF_SOURCE_DIR).mkdir()
        copy_companions(hf_dir, work / HF_SOURCE_DIR)
    m = model_cfg
    report(f"[convert] {hf_dir} ({hf['model_type']}, {m.num_layers} layers, hidden {m.hidden_size}, "
           f"{m.num_attention_heads}/{m.num_query_groups} heads, vocab {m.vocab_size}"
           + (f" padded to {padded}" if padded != m.vocab_size else "") + f") -> {out}")
    if position == "tapa" and hf["model_type"] == "llama":
        report("[convert] RoPE replaced by TAPA: the weights are the RoPE model's, so continue pretraining with "
               f"checkpoint.init_from={out} before evaluating.")
    return out
