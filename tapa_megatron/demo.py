"""`tapa demo`: the paper's comparison in miniature on a CPU.

Prepares the bundled Gutenberg novels, pretrains a tiny TAPA model and its RoPE twin at L tokens
(recipes/demo-cpu.yaml), fine-tunes both at 4L (recipes/demo-cpu-extend.yaml), evaluates both at
L..16L on held-out books (perplexity, passkey, distance bias), and writes OUT/results.json, tables
and plots. The paper's expectation: RoPE's perplexity rises past its trained length, TAPA's stays
near flat. What a model this small shows is reported as it comes out.
"""

import json
import time
from pathlib import Path

from tapa_megatron.config import load_config
from tapa_megatron.data.prepare import prepare
from tapa_megatron.eval import evaluate
from tapa_megatron.train import RunConfig, train

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
POSITIONS = ("tapa", "rope")


def _stage(recipe, out, name, position, overrides):
    cfg = load_config(RunConfig, RECIPES / recipe, [f"run_dir={out / 'runs' / name}", f"data.path={out / 'data'}",
                                                  f"model.position={position}", *overrides])
    return cfg, train(cfg).final_checkpoint


def run_demo(out, quick=False, vocab_size=1024, report=print):
    out = Path(out).resolve()
    started = time.time()
    if not (out / "data" / "manifest.json").is_file():
        prepare(out / "data", corpus="gutenberg", vocab_size=vocab_size)
    # quick: the same pipeline in a fraction of the steps (what CI runs)
    pre = ["training.steps=6", "optimizer.warmup_steps=1"] if quick else []
    ext = ["training.steps=2", "optimizer.warmup_steps=0"] if quick else []
    final = {}
    for position in POSITIONS:
        pre_cfg, pretrained = _stage("demo-cpu.yaml", out, f"{position}-pretrain", position, pre)
        ext_cfg, final[position] = _stage("demo-cpu-extend.yaml", out, f"{position}-extend", position,
                                          [*ext, f"checkpoint.init_from={pretrained}"])
    evaluation = evaluate(final, out / "eval", train_length=pre_cfg.data.seq_length,
                          extend_length=ext_cfg.data.seq_length,
                          max_tokens=1024 if quick else 8192, passkey_trials=1 if quick else 4,
                          bias_pairs=500 if quick else 10000, report=report)
    results = {"train_length": pre_cfg.data.seq_length, "extend_length": ext_cfg.data.seq_length,
               "lengths": evaluation["lengths"],
               "models": {name: {"ppl": evaluation["models"][name]["ppl"]} for name in POSITIONS},
               "details": str(out / "eval" / "results.json"), "minutes": (time.time() - started) / 60}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(results, report)
    report(f"[demo] done in {results['minutes']:.1f} min: {out / 'results.json'}, plots in {out / 'eval'}/ "
           "(perplexity.png, passkey.png, distance_bias.png)")
    return results


def _print_table(results, report):
    lengths = results["lengths"]
    report("\nperplexity on held-out books (pretrained at L = {}, fine-tuned at {}):".format(
        results["train_length"], results["extend_length"]))
    report("| model | " + " | ".join(f"{n // results['train_length']}L={n}" for n in lengths) + " |")
    report("|---" * (len(lengths) + 1) + "|")
    for name, entry in results["models"].items():
        report(f"| {name} | " + " | ".join(f"{p:.2f}" for p in entry["ppl"]) + " |")
