"""The ring schedule of `tapa_megatron.parallel.ring` as a picture (docs/context-parallel-ring.png).

Left: the causal attention matrix cut into 2·CP chunks in the load-balanced layout; each computed
block is labelled with the rank that computes it and the ring step at which it does. Right: what
every rank holds and computes at every step, with the hop that overlaps it.
"""

CASE_COLOURS = {"diagonal": "#e76f51", "lower": "#2a9d8f", "upper": "#e9c46a"}
STEP_COLOURS = ("#c6dbef", "#9ecae1", "#74b3d8", "#5aa0cf", "#b2abd2", "#9e9ac8", "#8c89c0", "#807dba")


def chunk_owner(chunk, cp):
    """The rank holding a chunk: rank r holds chunks r and 2·CP-1-r."""
    return chunk if chunk < cp else 2 * cp - 1 - chunk


def block_case(rank, source):
    if rank == source:
        return "diagonal"
    return "lower" if source < rank else "upper"


def draw_ring_schedule(path, cp=4):
    if not 2 <= cp <= len(STEP_COLOURS):
        raise ValueError(f"the figure draws CP = 2..{len(STEP_COLOURS)}, not {cp}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Polygon, Rectangle

    chunks = 2 * cp
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw=dict(width_ratios=(1, 1.25)))

    for q in range(chunks):
        for k in range(q + 1):
            rank = chunk_owner(q, cp)
            step = (rank - chunk_owner(k, cp)) % cp
            x, y = k, chunks - 1 - q
            colour = STEP_COLOURS[step]
            if q == k:  # causal within the chunk: the lower triangle only
                left.add_patch(Polygon([(x, y), (x + 1, y), (x, y + 1)], closed=True, facecolor=colour,
                                       edgecolor="white"))
                left.text(x + 0.3, y + 0.3, f"r{rank}\ns{step}", ha="center", va="center", fontsize=7)
            else:
                left.add_patch(Rectangle((x, y), 1, 1, facecolor=colour, edgecolor="white"))
                left.text(x + 0.5, y + 0.5, f"r{rank} s{step}", ha="center", va="center", fontsize=8)
    labels = [f"c{c}\n(r{chunk_owner(c, cp)})" for c in range(chunks)]
    left.set_xticks([c + 0.5 for c in range(chunks)], labels, fontsize=8)
    left.set_yticks([chunks - 1 - c + 0.5 for c in range(chunks)], labels, fontsize=8)
    left.set_xlim(0, chunks)
    left.set_ylim(0, chunks)
    left.set_aspect("equal")
    left.set_xlabel("key chunk (owner)")
    left.set_ylabel("query chunk (owner)")
    left.set_title(f"causal attention, CP={cp}: {chunks} chunks, rank r holds c(r) and c(2CP-1-r)\n"
                   "label: computing rank r at ring step s (2 chunk blocks per rank and step); white: masked",
                   fontsize=9)
    for step in range(cp):
        left.plot([], [], "s", color=STEP_COLOURS[step], label=f"step {step}")
    left.legend(loc="upper right", fontsize=8, frameon=False)

    for rank in range(cp):
        for step in range(cp):
            source = (rank - step) % cp
            case = block_case(rank, source)
            y = cp - 1 - rank
            right.add_patch(Rectangle((step * 1.6, y), 1.2, 0.8, facecolor=CASE_COLOURS[case], edgecolor="black",
                                      linewidth=0.6))
            keys = f"c{source}, c{2 * cp - 1 - source}"
            work = {"diagonal": "causal in shard", "lower": f"all q x c{source}",
                    "upper": f"c{2 * cp - 1 - rank} x all k"}[case]
            right.text(step * 1.6 + 0.6, y + 0.4, f"K,V of r{source}\n({keys})\n{case}: {work}", ha="center",
                       va="center", fontsize=6.5)
            if step + 1 < cp:  # the hop to the next rank, overlapping this step's compute
                target_y = cp - 1 - (rank + 1) % cp
                right.add_patch(FancyArrowPatch((step * 1.6 + 1.2, y + 0.4), (step * 1.6 + 1.6, target_y + 0.4),
                                                arrowstyle="-|>", mutation_scale=8, color="#555555", linewidth=0.7,
                                                connectionstyle="arc3,rad=0.0"))
    right.set_xlim(-0.1, cp * 1.6)
    right.set_ylim(-1.1, cp)
    right.xaxis.tick_top()
    right.set_xticks([s * 1.6 + 0.6 for s in range(cp)], [f"step {s}" for s in range(cp)], fontsize=8)
    right.set_yticks([cp - 1 - r + 0.4 for r in range(cp)], [f"rank {r}" for r in range(cp)], fontsize=8)
    right.tick_params(length=0)
    for side in right.spines.values():
        side.set_visible(False)
    right.text(0, -0.75, "forward: K,V (+ positions) hop r -> r+1 while the step computes (CP-1 hops); every step "
                         "is b*s^2/2 pairs\nbackward: the same ring again; dK,dV travel with their block and are "
                         "home after CP hops (fp32)", fontsize=7.5, va="center")
    right.set_title("ring schedule: what each rank attends to at each step\n"
                    "diagonal = own shard (causal), lower = source < rank, upper = source > rank", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
