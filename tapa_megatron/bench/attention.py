"""Attention benchmark: TAPA (Triton, torch path, reference) beside PyTorch SDPA on the same shapes.

On CUDA, SDPA runs twice: its flash kernel (`sdpa`, the choice of a RoPE user) and cuDNN's (`cudnn`).
Forward, backward alone (from a kept graph) and forward + backward are timed after warming up all three.

FLOPs are counted as FlashAttention's benchmark does: 4 * B * H * S^2 * D, halved for causal, for the
forward pass; the backward is 2.5x the forward, so forward + backward is 3.5x. TAPA's two half-width score products (amplitude and
phase) add up to one full-width QK^T, so the same count applies to both.
"""

import dataclasses
import os
import platform
import time

import torch
import torch.nn.functional as F

from tapa_megatron.ops import tapa_attention

IMPLEMENTATIONS = ("triton", "torch", "reference", "sdpa", "cudnn")


@dataclasses.dataclass
class Row:
    seq: int
    impl: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    peak_mib: float | None = None
    note: str = ""


def attention_flops(batch, heads, seq, head_dim, causal=True):
    flops = 4 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def versions():
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton not installed")
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def _time_ms(fn, device, repeats):
    """Wall time of fn in ms: the median of triton.testing.do_bench on CUDA; on CPU the fastest of
    `repeats` perf_counter samples (other processes on a shared CPU only add time, and stall the
    OpenMP threads of a sample by far more than its own spread)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(repeats * 10, 25))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return min(samples)


def _attention_fn(impl, args):
    if impl in ("sdpa", "cudnn"):
        # SDPA takes (B, H, S, D); on CUDA force one kernel: flash (sdpa) or cuDNN's (cudnn).
        def run(q, k, v):
            gqa = q.shape[2] != k.shape[2]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if q.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = SDPBackend.CUDNN_ATTENTION if impl == "cudnn" else SDPBackend.FLASH_ATTENTION
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)

        return run
    return lambda q, k, v: tapa_attention(q, k, v, alpha=args.alpha, theta=args.theta, backend=impl)


def _reference_bytes(batch, heads, seq, dtype):
    """The reference keeps about six (S, S) matrices per head alive through backward."""
    return 6 * batch * heads * seq * seq * torch.finfo(dtype).bits // 8


def measure(impl, seq, args, device, dtype):
    row = Row(seq=seq, impl=impl)
    too_big = args.max_reference_gib is not None and _reference_bytes(args.batch, args.heads, seq, dtype) > args.max_reference_gib * 2**30
    if impl == "reference" and too_big:
        need = _reference_bytes(args.batch, args.heads, seq, dtype) / 2**30
        row.note = f"skipped: needs ~{need:.0f} GiB for full score matrices"
        return row
    gen = torch.Generator(device=device).manual_seed(0)
    q_shape = (args.batch, seq, args.heads, args.head_dim)
    kv_shape = (args.batch, seq, args.kv_heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_()
               for shape in (q_shape, kv_shape, kv_shape))
    d_out = torch.randn(q_shape, generator=gen, device=device, dtype=dtype)
    attend = _attention_fn(impl, args)
    out = None

    def forward():
        with torch.no_grad():
            attend(q, k, v)

    def backward():
        torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(attend(q, k, v), (q, k, v), d_out)

    flops = attention_flops(args.batch, args.heads, seq, args.head_dim)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Warm up every path before timing any: the first call of each pays one-off costs (kernel
        # compiles, autograd and allocator caches), which a single forward warm-up left in fwd+bwd.
        forward_backward()
        forward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20  # one fwd+bwd
        row.fwd_ms = _time_ms(forward, device, args.repeats)
        row.fwd_bwd_ms = _time_ms(forward_backward, device, args.repeats)
        out = attend(q, k, v)
        backward()
        row.bwd_ms = _time_ms(backward, device, args.repeats)
    except torch.OutOfMemoryError:
        row.note = "out of memory"
    except RuntimeError as err:  # e.g. no flash kernel for this dtype/device
        row.note = f"failed: {str(err).splitlines()[0][:60]}"
    finally:
        del q, k, v, d_out, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if row.fwd_ms:
        row.fwd_tflops = flops / row.fwd_ms / 1e9
    if row.fwd_bwd_ms:
        row.fwd_bwd_tflops = 3.5 * flops / row.fwd_bwd_ms / 1e9
    return row


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows, baseline="sdpa"):
    base = {r.seq: r for r in rows if r.impl == baseline}
    header = ("seq", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "peak MiB",
              f"vs {baseline}", "note")
    lines = [header]
    for r in rows:
        ratio = None
        ref = base.get(r.seq)
        if ref and ref.fwd_bwd_ms and r.fwd_bwd_ms:
            ratio = ref.fwd_bwd_ms / r.fwd_bwd_ms
        lines.append((str(r.seq), r.impl, _fmt(r.fwd_ms), _fmt(r.bwd_ms), _fmt(r.fwd_bwd_ms), _fmt(r.fwd_tflops, 3),
                      _fmt(r.fwd_bwd_tflops, 3), _fmt(r.peak_mib, 0), "-" if ratio is None else f"{ratio:.2f}x",
                      r.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in dict.fromkeys(r.impl for r in rows):
        points = [(r.seq, r.fwd_bwd_tflops) for r in rows if r.impl == impl and r.fwd_bwd_tflops]
        if points:
            ax.plot(*zip(*points), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("fwd+bwd TFLOP/s (causal)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seqlens", type=int, nargs="+", default=None,
                        help="default: 8K..128K on CUDA, 256..2K on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default: 32 on CUDA, 4 on CPU")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: 8 on CUDA, --heads on CPU (no GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--theta", type=float, default=0.5)
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=None,
                        help="default: all on CUDA; torch, reference, sdpa on CPU (Triton's interpreter is not a "
                             "speed; cudnn is CUDA only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-reference-gib", type=float, default=None,
                        help="skip the reference where its score matrices would need more memory than this "
                             "(default: none on CUDA, where it runs until out of memory; 16 on CPU)")
    parser.add_argument("--plot", default=None, help="also write a PNG of fwd+bwd TFLOP/s against length")


def run(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    args.heads = args.heads or (32 if cuda else 4)
    args.kv_heads = args.kv_heads or (min(8, args.heads) if cuda else args.heads)
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}: pick a divisor.")
    if args.max_reference_gib is None and not cuda:
        args.max_reference_gib = 16.0
    seqlens = args.seqlens or ([2**i for i in range(13, 18)] if cuda else [256, 512, 1024, 2048])
    impls = args.impls or (IMPLEMENTATIONS if cuda else ("torch", "reference", "sdpa"))
    if "cudnn" in impls and not cuda:
        raise SystemExit("--impls cudnn needs a CUDA device (cuDNN attention); drop it or pass --device cuda.")
    title = (f"{device_description(device)} | {versions()}\n"
             f"{str(dtype).removeprefix('torch.')}, causal, batch {args.batch}, heads {args.heads}/{args.kv_heads} kv, "
             f"head_dim {args.head_dim}, alpha {args.alpha}, theta {args.theta}")
    print(f"# TAPA attention benchmark\n# {title.replace(chr(10), chr(10) + '# ')}", flush=True)
    rows = []
    out_of_memory = {}  # impl -> the first length it ran out of memory at
    for seq in seqlens:
        for impl in impls:
            if impl in out_of_memory:
                row = Row(seq=seq, impl=impl, note=f"skipped: out of memory at {out_of_memory[impl]}")
            else:
                row = measure(impl, seq, args, device, dtype)
                if row.note == "out of memory":
                    out_of_memory[impl] = seq
            rows.append(row)
            print(f"  seq {seq:>6} {impl:<9} fwd+bwd {_fmt(row.fwd_bwd_ms)} ms {row.note}", flush=True)
    print(format_table(rows))
    if args.plot:
        plot(rows, args.plot, title)
        print(f"plot: {args.plot}")
    return rows


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tapa_megatron.bench attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
