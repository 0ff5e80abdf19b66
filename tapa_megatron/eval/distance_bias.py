"""The paper's distance-bias study (Appendix I): does attention favour near tokens for their nearness?

From pre-softmax scores taken while the model reads held-out text, sample pairs that share a query:
one key at a distance drawn from a short range ([0, 100] in the paper), one from a long range
([10000, 10100]); Δ = score(short) − score(long). A position scheme with a distance bias (RoPE) skews
Δ positive; TAPA's is symmetric around 0. Small models get ranges scaled to their lengths.
"""

import numpy as np
import torch


def sample_deltas(score_fn, seq_len, num_layers, num_heads, short_range, long_range, pairs, seed=0):
    """Δ for `pairs` random (layer, head, query) samples.

    score_fn(layer, head, q_index, k_index) -> scores for equal-length int64 index tensors.
    Ranges are inclusive distances; queries are drawn so both keys exist.
    """
    if long_range[1] >= seq_len:
        raise ValueError(f"the long range {long_range} needs sequences longer than its end; got {seq_len} tokens.")
    rng = np.random.default_rng(seed)
    layers = rng.integers(0, num_layers, pairs)
    heads = rng.integers(0, num_heads, pairs)
    queries = rng.integers(long_range[1], seq_len, pairs)
    short = queries - rng.integers(short_range[0], short_range[1] + 1, pairs)
    long = queries - rng.integers(long_range[0], long_range[1] + 1, pairs)
    deltas = np.empty(pairs)
    for layer in range(num_layers):
        for head in range(num_heads):
            chosen = np.flatnonzero((layers == layer) & (heads == head))
            if len(chosen) == 0:
                continue
            q = torch.from_numpy(queries[chosen])
            near = score_fn(layer, head, q, torch.from_numpy(short[chosen]))
            far = score_fn(layer, head, q, torch.from_numpy(long[chosen]))
            deltas[chosen] = (near - far).double().numpy()
    return deltas


@torch.no_grad()
def model_deltas(eval_model, tokens, short_range, long_range, pairs, seed=0):
    """Δ samples from a model reading `tokens` (1-D): queries and keys captured at every layer's core
    attention, scored by that layer's own `pair_scores`."""
    attentions = eval_model.core_attentions()
    captured = {}

    def capture(index):
        def hook(module, args):
            captured[index] = (args[0][:, 0].double(), args[1][:, 0].double())  # [s, heads, D], batch 0

        return hook

    handles = [attn.register_forward_pre_hook(capture(i)) for i, attn in enumerate(attentions)]
    try:
        eval_model.token_losses(torch.as_tensor(tokens))
    finally:
        for handle in handles:
            handle.remove()
    heads = captured[0][0].shape[1]
    group = heads // captured[0][1].shape[1]

    def score_fn(layer, head, q_index, k_index):
        query, key = captured[layer]
        return attentions[layer].pair_scores(query[q_index, head], key[k_index, head // group], q_index, k_index)

    seq_len = len(tokens) - 1  # token_losses reads all but the last token
    return sample_deltas(score_fn, seq_len, len(attentions), heads, short_range, long_range, pairs, seed)


def statistics(deltas):
    return {"mean": float(np.mean(deltas)), "std": float(np.std(deltas)), "pairs": int(len(deltas))}


def plot_histograms(deltas_by_model, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, deltas in deltas_by_model.items():
        stats = statistics(deltas)
        ax.hist(deltas, bins=80, alpha=0.55, density=True,
                label=f"{name}: mean {stats['mean']:.2f}, std {stats['std']:.2f}")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("Δ = score(short distance) − score(long distance)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
