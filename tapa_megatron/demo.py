"""`tapa demo`: the paper's comparison in miniature on a CPU.

Prepares the bundled Gutenberg novels, pretrains a tiny TAPA model and its RoPE and NoPE (no
positional signal) twins at L tokens (recipes/demo-cpu.yaml), fine-tunes them at 4L
(recipes/demo-cpu-extend.yaml), evaluates them at L..16L on held-out books (perplexity, passkey,
distance bias) after the fine-tune, and the pretrained models' perplexity zero-shot (no fine-tune, the
paper's Table 2 setting), and writes OUT/results.json, tables and plots. The paper's expectation: RoPE's perplexity rises past its trained length, TAPA's stays
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
POSITIONS = ("tapa", "rope", "none")  # none: NoPE, the control that says whether a position signal helps


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
    pretrained, final = {}, {}
    for position in POSITIONS:
        pre_cfg, pretrained[position] = _stage("demo-cpu.yaml", out, f"{position}-pretrain", position, pre)
        ext_cfg, final[position] = _stage("demo-cpu-extend.yaml", out, f"{position}-extend", position,
                                          [*ext, f"checkpoint.init_from={pretrained[position]}"])
    evaluation = evaluate(final, out / "eval", train_length=pre_cfg.data.seq_length,
                          extend_length=ext_cfg.data.seq_length,
                          max_tokens=1024 if quick else 8192, passkey_trials=1 if quick else 4,
                          bias_pairs=500 if quick else 10000, report=report)
    zero_shot = evaluate(pretrained, out / "eval" / "zero-shot", train_length=pre_cfg.data.seq_length,
                         max_tokens=1024 if quick else 8192, passkey_trials=0, bias_pairs=0, report=report)
    results = {"train_length": pre_cfg.data.seq_length, "extend_length": ext_cfg.data.seq_length,
               "lengths": evaluation["lengths"],
               "models": {name: {"ppl": evaluation["models"][name]["ppl"],
                                 "ppl_zero_shot": zero_shot["models"][name]["ppl"],
                                 "passkey": _mean_passkey(evaluation["models"][name]["passkey"]),
                                 "distance_bias": evaluation["distance_bias"][name]}
                          for name in POSITIONS},
               "details": str(out / "eval" / "results.json"), "minutes": (time.time() - started) / 60}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report("\n" + results_table(results))
    report(f"[demo] done in {results['minutes']:.1f} min: {out / 'results.json'}, plots in {out / 'eval'}/ "
           "(perplexity.png, passkey.png, distance_bias.png)")
    return results


def _mean_passkey(by_length):
    """{length: {depth: accuracy}} -> accuracies by length, averaged over depths."""
    return [sum(by_depth.values()) / len(by_depth) for by_depth in by_length.values()]


NAMES = {"tapa": "TAPA", "rope": "RoPE", "none": "NoPE"}


def results_table(results):
    """The markdown tables the README shows, from a demo results.json: perplexity after the fine-tune and
    zero-shot, with 16L / 4L (the fine-tune length) and 16L / L ratios, then passkey accuracy."""
    lengths, train = results["lengths"], results["train_length"]
    heads = [f"{n // train}L" + (f" = {n}" if n == train else "") for n in lengths]
    sixteen, four = lengths.index(16 * train), lengths.index(4 * train)
    lines = []
    for key, title in (("ppl", f"perplexity after the fine-tune at 4L = {results['extend_length']}"),
                       ("ppl_zero_shot", "perplexity zero-shot (pretrained at L only)")):
        lines += [f"{title}:", "", "| model | " + " | ".join(heads) + " | 16L / 4L | 16L / L |",
                  "|---" * (len(lengths) + 3) + "|"]
        for name, entry in results["models"].items():
            ppl = entry[key]
            lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(f"{p:.2f}" for p in ppl)
                         + f" | {ppl[sixteen] / ppl[four]:.2f} | {ppl[sixteen] / ppl[0]:.2f} |")
        lines.append("")
    lines += ["passkey accuracy after the fine-tune (mean over depths):", "",
              "| model | " + " | ".join(heads) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, entry in results["models"].items():
        lines.append(f"| {NAMES.get(name, name)} | " + " | ".join(f"{a:.2f}" for a in entry["passkey"]) + " |")
    return "\n".join(lines) + "\n"
