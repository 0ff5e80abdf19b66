"""tapa plan: the TP x CP x PP x DP layouts that fit a TAPA GPT at a sequence length, best first,
with the memory per GPU broken down (formulas of tapa_megatron.plan; no GPU is used).

    tapa plan 8b --seq-len 128K --gpus 64
    tapa plan 70b --seq-len 1M --gpus 512 --recompute --json
    tapa plan --reach                     sequence length reachable per GPU, CP 1..64
    tapa plan --overlap                   ring step compute vs transfer at 128K and 1M tokens
    tapa plan --validate                  predicted vs measured memory of real CPU runs
    tapa plan --figure docs/context-parallel-ring.png
"""

import argparse
import json
import os
import platform
import re

from tapa_megatron.plan.comm import ATTENTION_FLOPS, MATMUL_EFFICIENCY

GIB = 2**30
REACH_MODELS = (("1b", 1), ("8b", 1), ("8b", 8))  # (preset, TP)
REACH_CP = (1, 2, 4, 8, 16, 32, 64)
OVERLAP_SEQ = (128 * 1024, 1024 * 1024)
OVERLAP_CP = (2, 4, 8, 16, 32, 64)


def tokens(text):
    """A token count: 131072, 128K or 1M (K = 1024)."""
    match = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a token count; write e.g. 131072, 128K or 1M.")
    return int(match[1]) * {"": 1, "k": 1024, "m": 1024**2}[match[2].lower()]


def add_arguments(parser):
    parser.add_argument("model", nargs="?", help="a preset in any case (tiny, 1b, 8B, 70b; also llama3-8b), a recipe "
                        "of recipes/ (llama3-8b-32k-extend) or a recipe YAML path")
    parser.add_argument("--seq-len", type=tokens, help="tokens per sequence: 131072, 128K, 1M (default: a recipe's)")
    parser.add_argument("--gpus", type=int, help="number of GPUs")
    parser.add_argument("--gpu", type=str.upper, default="H100",
                        help="GPU whose dense bf16 peak the step time and MFU use: H100, H200, A100 or B200 "
                        "(default H100)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80: H100)")
    parser.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: a recipe's, else 1)")
    parser.add_argument("--global-batch", type=int,
                        help="sequences per step, for the step time (default: a recipe's, else GPUs x micro-batch)")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction,
                        help="full activation recompute (every layer); default: a recipe's, else off")
    parser.add_argument("--matmul-efficiency", type=float, default=MATMUL_EFFICIENCY,
                        help=f"share of the GPU's peak the GEMMs reach, for the step time (default {MATMUL_EFFICIENCY}, "
                        "assumed)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default: LLaMA-3's 128256)")
    parser.add_argument("--cp-comm", choices=("p2p", "all_gather", "a2a"), default="p2p",
                        help="context-parallel scheme (default p2p, the ring)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--reserve", type=float, default=0.1,
                        help="share of GPU memory kept for the CUDA context, NCCL and fragmentation (default 0.1)")
    parser.add_argument("--attention-tflops", type=float, default=ATTENTION_FLOPS / 1e12,
                        help="achieved TAPA kernel TFLOP/s for the overlap and step-time estimates "
                        f"(default {ATTENTION_FLOPS / 1e12:g}, assumed)")
    parser.add_argument("--top", type=int, default=10, help="show the best N layouts (default 10)")
    parser.epilog = EXPOSED_COMM
    parser.add_argument("--excluded", action="store_true", help="also list the layouts that do not fit, and why")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--reach", action="store_true", help="longest sequence per GPU for 1B and 8B, CP 1..64")
    modes.add_argument("--overlap", action="store_true", help="ring step compute vs transfer, 128K and 1M tokens")
    modes.add_argument("--validate", action="store_true",
                       help="measure real CPU runs and compare with the predicted activations and peak")
    modes.add_argument("--figure", metavar="PNG", help="draw the ring schedule into PNG")
    parser.add_argument("--quick", action="store_true", help="with --validate: four small cases")


EXPOSED_COMM = ("exposed comm: communication per layer and micro-batch that compute does not hide (tensor "
                "parallelism's all-reduces / reduce-scatters, plus the ring's K/V transfer time beyond each ring "
                "step's attention compute); it adds to the step time, so lower is better.")


STEP_TIME = ("step s: one step of the global batch, 1F1B over the pipeline (matmuls and attention at the assumed "
             "rates, plus exposed comm, the pipeline's fill and drain, and the data-parallel reduce and gather); "
             "MFU: the step's model FLOPs over step time x GPUs x peak. Norms, SwiGLU, the loss and the optimizer "
             "update are not modelled (tapa_megatron/plan/speed.py).")


def _table(header, rows):
    lines = [tuple(header)] + [tuple(str(cell) for cell in row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def _gib(value):
    return f"{value / GIB:.1f}"


def _ms(seconds):
    return f"{seconds * 1e3:.2f}"


def _ratio(value):
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def _count(n):
    """Tokens in K = 1024 and M = 1024^2, as sequence lengths are quoted (131072 -> 128K)."""
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def versions():
    import torch
    from importlib.metadata import version

    return (f"python {platform.python_version()}, torch {torch.__version__}, "
            f"megatron-core {version('megatron-core')}")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _step_options(args):
    return dict(micro_batch=args.micro_batch, recompute=args.recompute, vocab_size=args.vocab,
                cp_comm=args.cp_comm)


def _fill_defaults(args):
    """Unset options from the recipe MODEL names (seq_len, micro_batch, global_batch, recompute), then the
    defaults that do not depend on a recipe."""
    from tapa_megatron.plan.search import recipe_step

    recipe = recipe_step(args.model) if args.model else {}
    for name, value in recipe.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.micro_batch = args.micro_batch or 1
    args.recompute = bool(args.recompute)


def _rates(args):
    from tapa_megatron.model.flops import PEAK_TFLOPS
    from tapa_megatron.plan.speed import Rates

    if args.gpu not in PEAK_TFLOPS:
        raise ValueError(f"--gpu {args.gpu} has no known peak; use one of {', '.join(PEAK_TFLOPS)}.")
    return Rates(peak_flops=PEAK_TFLOPS[args.gpu] * 1e12, matmul_efficiency=args.matmul_efficiency,
                 attention_flops=args.attention_tflops * 1e12, gpus_per_node=args.gpus_per_node)


def _speed_cells(speed):
    if speed is None:
        return ("-", "-", "-")
    return (f"{speed.seconds:.2f}", f"{speed.tokens_per_second:,.0f}", f"{speed.mfu:.0%}")


def run_plan(args):
    from tapa_megatron.plan.comm import ring_step
    from tapa_megatron.plan.memory import Step
    from tapa_megatron.plan.search import RANKING, candidates, resolve_model
    from tapa_megatron.plan.speed import step_time

    if not (args.model and args.seq_len and args.gpus):
        raise ValueError("tapa plan needs MODEL, --seq-len and --gpus (e.g. tapa plan 8b --seq-len 128K --gpus 64).")
    model = resolve_model(args.model)
    rates = _rates(args)
    global_batch = args.global_batch or args.gpus * args.micro_batch
    step = Step(seq_len=args.seq_len, **_step_options(args))
    flops = args.attention_tflops * 1e12
    found = candidates(model, step, args.gpus, args.gpu_mem, args.reserve, args.gpus_per_node, flops)
    fitting = sorted((c for c in found if c.excluded is None), key=lambda c: c.rank_key())
    excluded = [c for c in found if c.excluded is not None]
    speeds = {c.layout: step_time(model, c.layout, step, global_batch, rates) for c in fitting}
    if args.json:
        def speed_fields(speed):
            if speed is None:
                return dict(step_s=None)
            return dict(step_s=speed.seconds, micro_batches=speed.micro_batches, compute_s=speed.compute,
                        exposed_comm_s=speed.exposed_comm, bubble_s=speed.bubble, data_parallel_s=speed.data_parallel,
                        tokens_per_s_per_gpu=speed.tokens_per_second, mfu=speed.mfu)

        print(json.dumps(dict(
            model=args.model, seq_len=args.seq_len, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, ranking=RANKING,
            gpu=args.gpu, peak_tflops=rates.peak_flops / 1e12, matmul_efficiency=rates.matmul_efficiency,
            attention_tflops=args.attention_tflops, global_batch=global_batch, micro_batch=args.micro_batch,
            recompute=args.recompute,
            layouts=[dict(tp=c.layout.tp, cp=c.layout.cp, pp=c.layout.pp, dp=c.layout.dp,
                          weights=c.memory.weights, grads=c.memory.grads, optimizer=c.memory.optimizer,
                          activations=c.memory.activations, workspace=c.memory.workspace, total=c.memory.total,
                          peak_phase=c.memory.peak_phase, exposed_comm_s_per_layer=c.exposed_comm,
                          **speed_fields(speeds[c.layout])) for c in fitting],
            excluded=[dict(tp=c.layout.tp, cp=c.layout.cp, pp=c.layout.pp, dp=c.layout.dp, reason=c.excluded)
                      for c in excluded]), indent=1))
        return
    usable = args.gpu_mem * (1 - args.reserve)
    print(f"tapa plan {args.model}: {args.seq_len} tokens x micro-batch {args.micro_batch}, global batch "
          f"{global_batch}, {args.gpus} GPUs x {args.gpu_mem:g} GiB ({usable:.1f} usable), "
          f"{'full recompute' if args.recompute else 'no recompute'}, bf16, fused TAPA kernel, CP scheme {args.cp_comm}")
    print(f"source: formulas of tapa_megatron.plan (no GPU measured); step time at {args.gpu}'s "
          f"{rates.peak_flops / 1e12:g} TFLOP/s dense bf16 peak x {rates.matmul_efficiency:g} for matmuls and "
          f"{args.attention_tflops:g} TFLOP/s for attention (assumed)")
    print(f"ranked by: {', '.join(RANKING)}")
    if not fitting:
        print(f"\nno layout fits: {len(excluded)} excluded (--excluded lists why). Try --recompute, more GPUs or "
              "a shorter sequence.")
    else:
        rows = []
        for number, c in enumerate(fitting[:args.top], 1):
            m = c.memory
            ring = "-"
            if c.layout.cp > 1:
                r = ring_step(model, c.layout, step, args.gpus_per_node, flops)
                ring = f"{_ms(r.forward_compute)} / {_ms(r.forward_transfer)} {r.link}"
            rows.append((number, c.layout.tp, c.layout.cp, c.layout.pp, c.layout.dp,
                         args.micro_batch * args.seq_len // c.layout.cp, _gib(m.weights), _gib(m.grads),
                         _gib(m.optimizer), _gib(m.activations), _gib(m.workspace), _gib(m.total), m.peak_phase,
                         ring, _ms(c.exposed_comm), *_speed_cells(speeds[c.layout])))
        print()
        print(_table(("#", "TP", "CP", "PP", "DP", "tokens/rank", "weights", "grads", "optimizer", "activations",
                      "workspace", "total GiB", "peak at", "ring step ms: compute / transfer", "exposed comm ms/layer",
                      "step s", "tokens/s/GPU", "MFU"), rows))
        if len(fitting) > args.top:
            print(f"... and {len(fitting) - args.top} more layouts that fit (--top N)")
        timed = [c for c in fitting if speeds[c.layout] is not None]
        if timed:
            fastest = min(timed, key=lambda c: speeds[c.layout].seconds)
            print(f"fastest by the step-time estimate: #{fitting.index(fastest) + 1} {fastest.layout}, "
                  f"{speeds[fastest.layout].seconds:.2f} s per step, MFU {speeds[fastest.layout].mfu:.0%}")
        print(EXPOSED_COMM)
        print(STEP_TIME)
        if any(speeds[c.layout] is None for c in fitting[:args.top]):
            print(f"step '-': DP x micro-batch {args.micro_batch} does not divide the global batch {global_batch}.")
    if args.excluded and excluded:
        print()
        print(_table(("TP", "CP", "PP", "DP", "excluded because"),
                     [(c.layout.tp, c.layout.cp, c.layout.pp, c.layout.dp, c.excluded) for c in excluded]))


def run_reach(args):
    from tapa_megatron.plan.memory import Layout, Step
    from tapa_megatron.plan.search import max_seq_len, resolve_model

    print(f"Longest sequence that fits one GPU of {args.gpu_mem:g} GiB ({args.reserve:.0%} reserve), DP = PP = 1, "
          f"micro-batch {args.micro_batch}, bf16, fused TAPA kernel, p2p ring; distributed optimizer sharded over CP")
    print("source: formulas of tapa_megatron.plan (no GPU measured); cell: tokens per sequence "
          "(tokens per CP rank)")
    columns, header = [], ["CP"]
    for preset, tp in REACH_MODELS:
        for recompute in (False, True):
            columns.append((resolve_model(preset), tp, recompute))
            header.append(f"{preset} TP{tp}{' recompute' if recompute else ''}")
    rows = []
    for cp in REACH_CP:
        row = [cp]
        for model, tp, recompute in columns:
            step = Step(seq_len=2 * cp, **{**_step_options(args), "recompute": recompute})
            longest = max_seq_len(model, Layout(tp=tp, cp=cp), step, args.gpu_mem, args.reserve)
            row.append(f"{_count(longest)} ({_count(longest // cp)})" if longest else "does not fit")
        rows.append(row)
    print()
    print(_table(header, rows))


def run_overlap(args):
    from tapa_megatron.plan.comm import LINKS, overlap_threshold, ring_bytes, ring_step
    from tapa_megatron.plan.memory import Layout, Step
    from tapa_megatron.plan.search import resolve_model

    model = resolve_model(args.model or "8b")
    flops = args.attention_tflops * 1e12
    print(f"Ring step of the {args.model or '8b'} model (TP1, bf16, micro-batch {args.micro_batch}): forward "
          f"attention compute at {args.attention_tflops:g} TFLOP/s (assumed) vs K/V transfer per hop")
    for link, bandwidth in LINKS.items():
        threshold = overlap_threshold(model, 2, bandwidth, flops)
        print(f"  {link} {bandwidth / 1e9:g} GB/s per direction: hidden when S/CP >= e*F/(g*BW) = "
              f"2 * {flops:.3g} / ({model.num_attention_heads // model.num_query_groups} * {bandwidth:.3g}) "
              f"= {threshold:,.0f} tokens")
    rows = []
    for seq_len in OVERLAP_SEQ:
        step = Step(seq_len=seq_len, **_step_options(args))
        for cp in OVERLAP_CP:
            layout = Layout(cp=cp)
            nvlink = ring_step(model, layout, step, gpus_per_node=10**9, attention_flops=flops)
            infiniband = ring_step(model, layout, step, gpus_per_node=0, attention_flops=flops)
            forward, backward = ring_bytes(model, layout, step)
            rows.append((_count(seq_len), cp, _count(seq_len // cp), _ms(nvlink.forward_compute),
                         _ms(nvlink.forward_transfer), _ratio(nvlink.forward_compute / nvlink.forward_transfer),
                         _ms(infiniband.forward_transfer),
                         _ratio(infiniband.forward_compute / infiniband.forward_transfer),
                         _ms(nvlink.backward_dkv_transfer), _ms(infiniband.backward_dkv_transfer),
                         f"{forward / 2**20:.0f} / {backward / 2**20:.0f}"))
    print()
    print(_table(("seq", "CP", "tokens/rank", "step compute ms", "NVLink transfer ms", "compute/transfer",
                  "IB transfer ms", "compute/transfer", "bwd dK,dV hop NVLink ms", "IB ms",
                  "MiB sent per layer fwd / bwd"), rows))


def run_validate(args):
    from tapa_megatron.plan.measure import DEFAULT_CASES, QUICK_CASES, as_dicts, format_comparisons, validate

    rows = validate(QUICK_CASES if args.quick else DEFAULT_CASES)
    if args.json:
        print(json.dumps(dict(machine=machine(), versions=versions(), cases=as_dicts(rows)), indent=1))
        return
    print(f"Predicted (tapa_megatron.plan formulas) vs measured (live-tensor tracker) memory of one forward + "
          f"backward of the tiny preset on CPU, one rank; peak is over the memory before the step")
    print(f"machine: {machine()}; {versions()}")
    print()
    print(format_comparisons(rows))
    worst = max(rows, key=lambda r: abs(r.activation_error))
    worst_peak = max(rows, key=lambda r: abs(r.peak_error))
    print(f"\nlargest error: activations {worst.activation_error:+.2%} ({worst.case}), "
          f"peak {worst_peak.peak_error:+.2%} ({worst_peak.case})")


def run(args):
    try:
        _fill_defaults(args)
        if args.validate:
            run_validate(args)
        elif args.reach:
            run_reach(args)
        elif args.overlap:
            run_overlap(args)
        elif args.figure:
            from tapa_megatron.plan.figure import draw_ring_schedule

            draw_ring_schedule(args.figure)
            print(f"wrote {args.figure}")
        else:
            run_plan(args)
    except ValueError as err:
        raise SystemExit(f"tapa plan: {err}") from None
