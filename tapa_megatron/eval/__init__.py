"""Long-context evaluation of trained checkpoints: sliding-window perplexity at 1x..16x the training
length, passkey retrieval, and the distance-bias histogram; each writes JSON + CSV + PNG.

    from tapa_megatron.eval import evaluate
    evaluate({"tapa": "runs/a", "rope": "runs/b"}, out_dir="eval")
"""

import csv
import json
from pathlib import Path

from tapa_megatron.eval import distance_bias, passkey, perplexity
from tapa_megatron.eval.model import load_eval_model

MULTIPLES = (1, 2, 4, 8, 16)


def held_out_documents(data_dir, tokenizer):
    """Token lists of the whole books `tapa data prepare` held out (DATA/test/*.txt)."""
    paths = sorted((Path(data_dir) / "test").glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"{data_dir}/test/ holds no held-out books; prepare the data with test books.")
    return [tokenizer.encode(path.read_text(encoding="utf-8")) for path in paths]


def line_plot(series, x, xlabel, ylabel, title, log_y=False, mark_x=(), ylim=None):
    """A matplotlib figure of one line per series over x (log2 x axis); the caller saves and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
    if ylim is not None:  # before the marks: their labels sit at the top of the axis
        ax.set_ylim(*ylim)
    for value, label in mark_x:
        ax.axvline(value, color="gray", linestyle="--", linewidth=0.8)
        ax.text(value, ax.get_ylim()[1], f" {label}", va="top", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


def passkey_plot(accuracies, lengths, mark_x=()):
    """Mean passkey accuracy by length; the y axis always spans 0..1, so all-zero (or all-one) runs read
    as such rather than as a zoomed-in band around one value."""
    return line_plot(accuracies, lengths, "context length (tokens)", "passkey accuracy (mean over depths)",
                     "passkey retrieval", mark_x=mark_x, ylim=(-0.05, 1.05))


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def evaluate(checkpoints, out_dir, *, multiples=MULTIPLES, stride=256, max_tokens=8192, data_dir=None,
             passkey_trials=4, passkey_depths=(0.1, 0.5, 0.9), bias_pairs=10000, report=print, train_length=None,
             extend_length=None):
    """Evaluate {name: checkpoint} side by side. Returns the results dict (also written as JSON).

    Context lengths are multiples of L: train_length, by default the first model's training length
    (give the pretraining length for fine-tuned checkpoints). extend_length, marked on the plots, is by
    default the training length of the first model whose run was an extension (checkpoint.init_from).
    Each window slides by min(stride, context / 2), so the paper's 256 holds from 512 tokens on and
    small models keep at least half a window of context for every scored token.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, path in checkpoints.items():
        models[name] = load_eval_model(path, name)
        report(f"[eval] {name:>6} loaded {models[name].checkpoint} (step {models[name].step})")
    first = next(iter(models.values()))
    train_length = train_length or first.train_length
    extend_length = extend_length or next((m.train_length for m in models.values() if m.extended), None)
    lengths = [m * train_length for m in multiples]
    data_dir = data_dir or _data_dir_of(checkpoints[first.name])
    documents = held_out_documents(data_dir, first.tokenizer)
    results = {"train_length": train_length, "extend_length": extend_length, "lengths": lengths,
               "stride": stride, "max_tokens_per_document": max_tokens, "models": {}}

    # one unit of progress: a model's perplexity, or its passkey accuracy, at one length
    total, done = len(models) * len(lengths) * (2 if passkey_trials else 1), 0
    for name, model in models.items():
        entry = results["models"][name] = {"position": model.config.position, "checkpoint": str(model.checkpoint),
                                           "step": model.step, "ppl": []}
        for length in lengths:
            ppl = perplexity.perplexity(model.token_losses, documents, length, min(stride, max(length // 2, 1)),
                                        max_tokens)
            entry["ppl"].append(ppl)
            done += 1
            report(f"[eval] {name:>6} ppl @ {length:>6} tokens: {ppl:10.3f}  ({done}/{total})")
    marks = [(train_length, "L")] + ([(extend_length, "fine-tune")] if extend_length else [])
    _save(line_plot({n: m["ppl"] for n, m in results["models"].items()}, lengths, "context length (tokens)",
                    "perplexity (held-out books)", f"sliding-window perplexity, L = {train_length}", log_y=True,
                    mark_x=marks), out_dir / "perplexity.png")
    _write_csv(out_dir / "perplexity.csv", ["length", *results["models"]],
               [[length, *(m["ppl"][i] for m in results["models"].values())] for i, length in enumerate(lengths)])

    if passkey_trials:
        for name, model in models.items():
            table = {}
            for length in lengths:
                table.update(passkey.passkey_accuracy(model.next_token_logits, model.tokenizer, [length],
                                                      passkey_depths, passkey_trials))
                done += 1
                report(f"[eval] {name:>6} passkey @ {length:>6} tokens: "
                       f"{sum(table[length].values()) / len(passkey_depths):.2f}  ({done}/{total})")
            results["models"][name]["passkey"] = {str(k): {str(d): a for d, a in v.items()} for k, v in table.items()}
        _save(passkey_plot({n: [sum(m["passkey"][str(k)].values()) / len(passkey_depths) for k in lengths]
                            for n, m in results["models"].items()}, lengths, mark_x=marks), out_dir / "passkey.png")

    if bias_pairs:
        # The paper's ranges at 8K training length are [0, 100] and [10000, 10100]; here both scale with
        # the evaluation length: short = [0, S/100], long = [S/2, S/2 + S/100] with S = 8 L.
        span = 8 * train_length
        width = max(span // 100, 1)
        short_range, long_range = (0, width), (span // 2, span // 2 + width)
        tokens = next(doc for doc in documents if len(doc) > span)[:span + 1]
        deltas = {name: distance_bias.model_deltas(model, tokens, short_range, long_range, bias_pairs)
                  for name, model in models.items()}
        results["distance_bias"] = {"short_range": short_range, "long_range": long_range,
                                    **{name: distance_bias.statistics(d) for name, d in deltas.items()}}
        for name, d in deltas.items():
            stats = distance_bias.statistics(d)
            report(f"[eval] {name:>6} distance bias: mean {stats['mean']:.3f}, std {stats['std']:.3f}")
        distance_bias.plot_histograms(deltas, out_dir / "distance_bias.png",
                                      f"Δ = score(d in {list(short_range)}) − score(d in {list(long_range)}), "
                                      f"{bias_pairs} pairs")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _data_dir_of(path):
    from tapa_megatron.train import checkpoint

    return checkpoint.load_common(checkpoint.resolve_checkpoint(path))["config"]["data"]["path"]
