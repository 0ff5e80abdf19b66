"""The TP x CP x PP x DP layouts of G GPUs that fit a TAPA GPT at a sequence length, best first.

Ranking (the order of `RANKING`):
  1. fewest model-parallel ranks TP·CP·PP: every extra rank sharing one sequence adds communication
     on the critical path, while data parallelism's gradient reduction overlaps the backward;
  2. fewest pipeline stages: a pipeline idles (PP-1)/(PP-1+m) of a step with m micro-batches, a cost
     no overlap removes;
  3. least exposed communication per layer (`comm.exposed_seconds`): TP's collectives, and the
     ring's transfer time beyond each step's compute;
  4. least memory per GPU.
A layout is excluded, with the reason recorded, when a rule of the model or the code forbids it or
its memory (model state + activations + workspace) exceeds the GPU's memory less a reserve for the
CUDA context, NCCL buffers and allocator fragmentation.
"""

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from tapa_megatron.plan.comm import ATTENTION_FLOPS, exposed_seconds
from tapa_megatron.plan.memory import Layout, Memory, Step, memory_per_gpu

GIB = 2**30
RANKING = ("model-parallel ranks", "pipeline stages", "exposed communication", "memory")


@dataclass
class Candidate:
    layout: Layout
    memory: Memory | None  # None when a rule excludes the layout before its memory is computed
    exposed_comm: float | None  # seconds per layer and micro-batch
    excluded: str | None  # why it does not run, or None when it fits

    def rank_key(self):
        return (self.layout.model_parallel, self.layout.pp, self.exposed_comm, self.memory.total)


RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def _recipe_file(name):
    """The recipe YAML that name points to (a path, or a recipe of recipes/ with or without .yaml), or None."""
    for candidate in (Path(name), RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file() and candidate.suffix in (".yaml", ".yml"):
            return candidate
    return None


def resolve_model(model):
    """A ModelConfig from: a ModelConfig; a preset of `tapa_megatron.model.PRESETS` in any case, alone or
    in a LLaMA-style name (8B, llama3-8b); or a recipe (a name of recipes/ or a YAML path), whose model
    section is used."""
    if not isinstance(model, str):
        return model
    # Imported here: tapa_megatron.model pulls in megatron-core (seconds), which `tapa --help` should not pay.
    from tapa_megatron.config import from_dict, read_yaml
    from tapa_megatron.model import PRESETS, ModelConfig

    recipe = _recipe_file(model)
    if recipe is not None:
        return from_dict(ModelConfig, read_yaml(recipe).get("model", {}), prefix="model.")
    name = model.lower()
    named = re.fullmatch(r"(?:llama-?\d*(?:\.\d+)?-)?(\w+)", name)  # llama3-8b, llama-3.1-70b -> 8b, 70b
    preset = named[1] if named else name
    if preset not in PRESETS:
        raise ValueError(f"model {model!r} is not a preset or a recipe; use one of {', '.join(PRESETS)} "
                         "(any case, or e.g. llama3-8b), a recipe name of recipes/ or a recipe YAML path.")
    return ModelConfig(preset=preset)


def recipe_step(model):
    """What a recipe (a name of recipes/ or a YAML path) says of its step: seq_len, micro_batch,
    global_batch, recompute (those it sets); {} for a preset name."""
    recipe = _recipe_file(model) if isinstance(model, str) else None
    if recipe is None:
        return {}
    from tapa_megatron.config import read_yaml

    raw = read_yaml(recipe)
    data, training = raw.get("data", {}), raw.get("training", {})
    found = dict(seq_len=data.get("seq_length"), micro_batch=training.get("micro_batch_size"),
                 global_batch=training.get("global_batch_size"), recompute=training.get("recompute") == "full")
    return {key: value for key, value in found.items() if value is not None}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_rule(model, layout, step, gpus_per_node):
    """Why a layout cannot run this model and step (None when nothing forbids it)."""
    heads, groups = model.num_attention_heads, model.num_query_groups
    if heads % layout.tp or groups % layout.tp:
        return f"TP {layout.tp} does not divide the {heads} query / {groups} key-value heads"
    if model.ffn_hidden_size % layout.tp:
        return f"TP {layout.tp} does not divide the FFN width {model.ffn_hidden_size}"
    if layout.tp > gpus_per_node:
        return f"TP {layout.tp} would span nodes ({gpus_per_node} GPUs per node)"
    if model.num_layers % layout.pp:
        return f"PP {layout.pp} does not divide the {model.num_layers} layers"
    if layout.cp > 1 and step.seq_len % (2 * layout.cp):
        return f"sequence {step.seq_len} is not a multiple of 2 x CP = {2 * layout.cp} (load-balanced layout)"
    if layout.cp > 1 and step.cp_comm == "a2a" and (heads // layout.tp) % layout.cp:
        return f"a2a: CP {layout.cp} does not divide the {heads // layout.tp} query heads per TP rank"
    return None


def candidates(model, step, gpus, gpu_mem_gib=80.0, reserve=0.1, gpus_per_node=8,
               attention_flops=ATTENTION_FLOPS):
    """Every TP x CP x PP x DP factorisation of `gpus`, each with its memory or the reason it is excluded."""
    usable = gpu_mem_gib * GIB * (1 - reserve)
    found = []
    for tp in _divisors(gpus):
        for cp in _divisors(gpus // tp):
            for pp in _divisors(gpus // (tp * cp)):
                layout = Layout(tp, cp, pp, gpus // (tp * cp * pp))
                rule = layout_rule(model, layout, step, gpus_per_node)
                if rule:
                    found.append(Candidate(layout, None, None, rule))
                    continue
                memory = memory_per_gpu(model, layout, step)
                too_big = None
                if memory.total > usable:
                    too_big = (f"needs {memory.total / GIB:.1f} GiB per GPU, over {usable / GIB:.1f} GiB "
                               f"({gpu_mem_gib:g} GiB less {reserve:.0%} reserve)")
                found.append(Candidate(layout, memory, exposed_seconds(model, layout, step, gpus_per_node,
                                                                       attention_flops), too_big))
    return found


def plan(model, seq_len, gpus, gpu_mem_gb=80.0, *, micro_batch=1, recompute=False, reserve=0.1, gpus_per_node=8,
         attention_flops=ATTENTION_FLOPS, **step_options):
    """The layouts of `gpus` GPUs that fit `model` (a ModelConfig or preset name) at seq_len, best first.

    gpu_mem_gb is the memory of one GPU in GiB (an H100 80GB holds 79.6); step_options go to `Step`
    (e.g. vocab_size, attention, cp_comm, sequence_parallel)."""
    model = resolve_model(model)
    step = Step(seq_len=seq_len, micro_batch=micro_batch, recompute=recompute, **step_options)
    fitting = [c for c in candidates(model, step, gpus, gpu_mem_gb, reserve, gpus_per_node, attention_flops)
               if c.excluded is None]
    return sorted(fitting, key=Candidate.rank_key)


def max_seq_len(model, layout, step, gpu_mem_gib=80.0, reserve=0.1, granularity=1024):
    """The longest sequence (a multiple of `granularity` and of 2·CP) that fits one GPU of `layout`, or 0."""
    usable = gpu_mem_gib * GIB * (1 - reserve)
    unit = math.lcm(granularity, 2 * layout.cp)

    def fits(units):
        return memory_per_gpu(model, layout, replace(step, seq_len=units * unit)).total <= usable

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # memory grows with the sequence: bisect between a fit and a miss
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * unit
