"""`tapa study`: why TAPA learns slowly at demo scale, one change at a time.

Every variant pretrains the demo's model (recipes/demo-cpu.yaml: 2 layers, d = 128, L = 64) with a few
overrides and is evaluated zero-shot on the held-out books at L, 4L and 16L. Recorded per variant: the
perplexities, the final training loss and the grad-norm curve. OUT/results.json is rewritten after each
variant and a variant already in it is not rerun, so an interrupted study continues where it stopped.
Also recorded every 10 steps: grad norms by parameter group (q/k phase rows, q/k amplitude rows, v rows,
the rest; train/grad_groups.py), for where a grad-norm climb comes from. Plots: OUT/grad_norm.png (grad
norm by step), OUT/perplexity.png (perplexity at L by variant), OUT/grad_norm_groups.png (by group).
"""

import json
import time
from pathlib import Path

from tapa_megatron.config import load_config
from tapa_megatron.data.prepare import prepare
from tapa_megatron.eval import evaluate
from tapa_megatron.train import RunConfig, train
from tapa_megatron.train.distributed import teardown_parallel

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo-cpu.yaml"

# name: overrides of demo-cpu.yaml, in the order a full study runs them (the leading hypotheses first).
# The learning rate and warm-up are swept for every scheme alike; the other TAPA rows change one setting
# from the paper's (lr 2e-3, warm-up 40, phase_scale 2 pi, alpha 0.1, theta 0.5).
VARIANTS = {
    "tapa lr 2e-3": ["model.position=tapa"],
    "tapa phase_scale 1": ["model.position=tapa", "model.tapa.phase_scale=1.0"],
    "rope lr 2e-3": ["model.position=rope"],
    "nope lr 2e-3": ["model.position=none"],
    "tapa lr 1e-3": ["model.position=tapa", "optimizer.lr=1e-3"],
    "tapa lr 4e-3": ["model.position=tapa", "optimizer.lr=4e-3"],
    "tapa phase_scale 1 lr 4e-3": ["model.position=tapa", "model.tapa.phase_scale=1.0", "optimizer.lr=4e-3"],
    "rope lr 1e-3": ["model.position=rope", "optimizer.lr=1e-3"],
    "rope lr 4e-3": ["model.position=rope", "optimizer.lr=4e-3"],
    "nope lr 1e-3": ["model.position=none", "optimizer.lr=1e-3"],
    "nope lr 4e-3": ["model.position=none", "optimizer.lr=4e-3"],
    "tapa warmup 100": ["model.position=tapa", "optimizer.warmup_steps=100"],
    "rope warmup 100": ["model.position=rope", "optimizer.warmup_steps=100"],
    "nope warmup 100": ["model.position=none", "optimizer.warmup_steps=100"],
    "tapa alpha 0.05": ["model.position=tapa", "model.tapa.alpha=0.05"],
    "tapa theta 0.75": ["model.position=tapa", "model.tapa.theta=0.75"],
    "tapa phase_scale 1 lr 1e-3": ["model.position=tapa", "model.tapa.phase_scale=1.0", "optimizer.lr=1e-3"],
    # phase_scale 1's first angles at 2 pi: phi is bilinear in q_P, k_P, so both scaled by (2 pi)^-1/2; Adam's
    # steps on the angle stay 2 pi x phase_scale 1's, so this separates the init from the training dynamics
    "tapa phase_init_scale 0.4": ["model.position=tapa", "model.tapa.phase_init_scale=0.3989422804014327"],
    # a second initialisation (training.seed) of the four main rows: how far one seed's numbers can be trusted
    "tapa seed 2": ["model.position=tapa", "training.seed=2"],
    "tapa phase_scale 1 seed 2": ["model.position=tapa", "model.tapa.phase_scale=1.0", "training.seed=2"],
    "rope seed 2": ["model.position=rope", "training.seed=2"],
    "nope seed 2": ["model.position=none", "training.seed=2"],
}
MULTIPLES = (1, 4, 16)
GROUP_PANELS = 4  # grad_norm_groups.png: the first variants run (TAPA, phase_scale 1, RoPE, NoPE)


def run_variant(out, name, overrides, quick):
    steps = ["training.steps=6", "optimizer.warmup_steps=1", "training.log_every=2"] if quick else []
    slug = name.replace(" ", "_")
    cfg = load_config(RunConfig, RECIPE, [f"run_dir={out / 'runs' / slug}", f"data.path={out / 'data'}",
                                          "training.log_every=10", "training.grad_norm_groups=true",
                                          *overrides, *steps])
    result = train(cfg)
    groups = [norms for _, norms in result.grad_norm_groups]
    evaluation = evaluate({slug: result.final_checkpoint}, out / "eval" / slug, multiples=MULTIPLES,
                          max_tokens=1024 if quick else 4096, passkey_trials=0, bias_pairs=0)
    teardown_parallel()  # evaluation leaves Megatron's one-rank parallel state set up; the next train sets its own
    return {"overrides": overrides, "ppl": evaluation["models"][slug]["ppl"], "lengths": evaluation["lengths"],
            "final_loss": sum(loss for _, loss, _ in result.losses[-20:]) / len(result.losses[-20:]),
            "grad_norm": [norm for _, _, norm in result.losses],
            "grad_norm_groups": {"steps": [step for step, _ in result.grad_norm_groups],
                                 **{group: [norms[group] for norms in groups] for group in groups[0]}}}


def run_study(out, quick=False, only=None, report=print):
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "manifest.json").is_file():
        prepare(out / "data", corpus="gutenberg", vocab_size=1024)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    names = [n for n in VARIANTS if only is None or n in only]
    for index, name in enumerate(names, 1):
        if name in results:
            report(f"[study] {index}/{len(names)} {name}: in {path}, skipped")
            continue
        started, cpu_started = time.time(), time.process_time()
        results[name] = run_variant(out, name, VARIANTS[name], quick)
        results[name]["minutes"] = (time.time() - started) / 60
        results[name]["cpu_minutes"] = (time.process_time() - cpu_started) / 60
        path.write_text(json.dumps(results, indent=2))
        report(f"[study] {index}/{len(names)} {name}: ppl " + " / ".join(f"{p:.1f}" for p in results[name]["ppl"])
               + f" at {MULTIPLES}L, max grad norm {max(results[name]['grad_norm']):.2f}")
    report("\n" + study_table(results) + "\n" + group_table(results))
    plot(results, out)
    return results


def study_table(results):
    lines = ["| variant | ppl L | ppl 4L | ppl 16L | 16L / L | final loss | grad norm first 50 / max / last 50 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        g = r["grad_norm"]
        head, tail = g[:50], g[-50:]
        lines.append(f"| {name} | {r['ppl'][0]:.1f} | {r['ppl'][1]:.1f} | {r['ppl'][2]:.1f} | "
                     f"{r['ppl'][2] / r['ppl'][0]:.2f} | {r['final_loss']:.3f} | "
                     f"{sum(head) / len(head):.2f} / {max(g):.2f} / {sum(tail) / len(tail):.2f} |")
    return "\n".join(lines) + "\n"


GROUP_COLUMNS = (("qk phase",), ("qk amplitude", "qk"), ("v",), ("attention out",), ("mlp",), ("embedding",),
                 ("output layer",), ("norms",))  # a baseline's q/k rows (no phase part) go in the amplitude column


def group_table(results):
    """Grad norm by parameter group (grad_groups.py) at step 100, at the logged step with the largest
    total grad norm, and at the last step, for every variant that recorded them."""
    lines = ["| variant | step | total | qk phase | qk amplitude (baselines: all qk) | v | attention out | mlp | "
             "embedding | output layer | norms |", "|---|" + "---|" * 10]
    for name, r in results.items():
        groups = r.get("grad_norm_groups")
        if not groups:
            continue
        steps = groups["steps"]
        total = [r["grad_norm"][step - 1] for step in steps]
        peak = max(range(len(steps)), key=total.__getitem__)
        for i in sorted({min(range(len(steps)), key=lambda i: abs(steps[i] - 100)), peak, len(steps) - 1}):
            cells = [next((f"{groups[g][i]:.3f}" for g in column if g in groups), "–") for column in GROUP_COLUMNS]
            lines.append(f"| {name} | {steps[i]}{' (peak)' if i == peak else ''} | {total[i]:.3f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        ax.plot(range(1, len(r["grad_norm"]) + 1), r["grad_norm"], label=name, linewidth=0.9,
                linestyle="-" if name.startswith("tapa") else "--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("grad norm (before clipping)")
    ax.set_title("pretraining at L = 64 (demo model)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grad_norm.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(results)
    ax.barh(names, [results[n]["ppl"][0] for n in names], label="L")
    ax.scatter([results[n]["ppl"][2] for n in names], names, color="black", marker="x", label="16L", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity (zero-shot)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)

    with_groups = [n for n in results if results[n].get("grad_norm_groups")][:GROUP_PANELS]
    if not with_groups:
        return
    fig, axes = plt.subplots(1, len(with_groups), figsize=(4 * len(with_groups), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], with_groups):
        groups = results[name]["grad_norm_groups"]
        for group, norms in groups.items():
            if group != "steps":
                ax.plot(groups["steps"], norms, label=group, linewidth=1.2 if group.startswith("qk") else 0.8)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("grad norm by parameter group")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grad_norm_groups.png", dpi=100)
    plt.close(fig)
