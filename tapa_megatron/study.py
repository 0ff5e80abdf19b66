"""`tapa study`: why TAPA learns slowly at demo scale, one change at a time.

Every variant pretrains the demo's model (recipes/demo-cpu.yaml: 2 layers, d = 128, L = 64) with a few
overrides and is evaluated zero-shot on the held-out books at L, 4L and 16L. Recorded per variant: the
perplexities, the final training loss and the grad-norm curve. OUT/results.json is rewritten after each
variant and a variant already in it is not rerun, so an interrupted study continues where it stopped.
Plots: OUT/grad_norm.png (grad norm by step) and OUT/perplexity.png (perplexity at L by variant).
"""

import json
import time
from pathlib import Path

from tapa_megatron.config import load_config
from tapa_megatron.data.prepare import prepare
from tapa_megatron.eval import evaluate
from tapa_megatron.train import RunConfig, train

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo-cpu.yaml"

# name: overrides of demo-cpu.yaml. The learning rates are swept for every scheme alike; the TAPA-only
# rows change one setting from the paper's (lr 2e-3, phase_scale 2 pi, alpha 0.1, theta 0.5).
VARIANTS = {
    "tapa lr 2e-3": ["model.position=tapa"],
    "tapa lr 4e-3": ["model.position=tapa", "optimizer.lr=4e-3"],
    "tapa lr 8e-3": ["model.position=tapa", "optimizer.lr=8e-3"],
    "tapa warmup 100": ["model.position=tapa", "optimizer.warmup_steps=100"],
    "tapa phase_scale 1": ["model.position=tapa", "model.tapa.phase_scale=1.0"],
    "tapa phase_scale 1 lr 4e-3": ["model.position=tapa", "model.tapa.phase_scale=1.0", "optimizer.lr=4e-3"],
    "tapa alpha 0.05": ["model.position=tapa", "model.tapa.alpha=0.05"],
    "tapa theta 0.75": ["model.position=tapa", "model.tapa.theta=0.75"],
    "rope lr 2e-3": ["model.position=rope"],
    "rope lr 4e-3": ["model.position=rope", "optimizer.lr=4e-3"],
    "nope lr 2e-3": ["model.position=none"],
    "nope lr 4e-3": ["model.position=none", "optimizer.lr=4e-3"],
}
MULTIPLES = (1, 4, 16)


def run_variant(out, name, overrides, quick):
    steps = ["training.steps=6", "optimizer.warmup_steps=1"] if quick else []
    slug = name.replace(" ", "_")
    cfg = load_config(RunConfig, RECIPE, [f"run_dir={out / 'runs' / slug}", f"data.path={out / 'data'}",
                                          "training.log_every=100", *overrides, *steps])
    result = train(cfg)
    evaluation = evaluate({slug: result.final_checkpoint}, out / "eval" / slug, multiples=MULTIPLES,
                          max_tokens=1024 if quick else 4096, passkey_trials=0, bias_pairs=0)
    return {"overrides": overrides, "ppl": evaluation["models"][slug]["ppl"], "lengths": evaluation["lengths"],
            "final_loss": sum(loss for _, loss, _ in result.losses[-20:]) / len(result.losses[-20:]),
            "grad_norm": [norm for _, _, norm in result.losses]}


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
        started = time.time()
        results[name] = run_variant(out, name, VARIANTS[name], quick)
        results[name]["minutes"] = (time.time() - started) / 60
        path.write_text(json.dumps(results, indent=2))
        report(f"[study] {index}/{len(names)} {name}: ppl " + " / ".join(f"{p:.1f}" for p in results[name]["ppl"])
               + f" at {MULTIPLES}L, max grad norm {max(results[name]['grad_norm']):.2f}")
    report("\n" + study_table(results))
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
