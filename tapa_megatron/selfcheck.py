"""`tapa selfcheck --out REPORT.json [--cpu]`: the checks a first run on new hardware needs, in one call.

    kernels    TAPA attention against the float64 reference (forward out and lse, backward with the
               d_lse path), D 64/128, theta 0.25/0.5, both phases, positions offset by 1e6, rows with
               no visible key, packed documents with partial tiles; backward bitwise equal over two runs.
               Triton in bf16 and fp32 on GPU; the torch path in fp32 on CPU.
    engines    GPU: MegatronEngine against PortableEngine on the same device (fp32, world size 1,
               4 steps): losses and grad norms equal within 1e-5 relative.
    extension  a weights-only extension's first two losses stay within 2% of the source's loss at the
               saved weights (bf16 MegatronEngine on GPU, fp32 PortableEngine on CPU). The second loss
               is the one a lost load shows: the optimizer's stale main params overwrite the weights
               at the first step.
    transformer_engine
               GPU with Transformer Engine: the TE spec's forward against the local spec's (TAPA, and
               RoPE on Megatron's rotary embedding and TE's attention), fp32 and bf16. The local model's
               weights move into the TE model through Megatron's dist_checkpointing (the local spec's
               sharded_state_dict_keys_map renames its norms to TE's fused layer_norm_weight); the
               logits on the same tokens must agree within 1e-2 (fp32: TE may run fp32 GEMMs in TF32)
               and 5e-2 (bf16) of the largest logit, and differ by over 0.1 before the transfer.
               Skipped without TE or CUDA; CI runs the same transfer local spec -> local spec
               (tests/test_selfcheck.py).
    bench      `tapa bench attention`'s timings: GPU: Triton TAPA beside SDPA-flash and cuDNN at 8K and
               16K (bf16, B=1, H=32, Hkv=8, D=128, causal), fwd / bwd / fwd+bwd ms, peak MiB and TAPA's
               fwd+bwd time over SDPA-flash's; CPU: the torch path beside SDPA at 256 tokens. A timing
               is a figure, not a pass criterion: the check fails only when a path errors.

Every check reports pass / fail / skipped (with the reason) and its figures; the command exits 1 when
any check failed. --cpu runs what a CPU can run (CI runs it).
"""

import dataclasses
import json
import math
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch

SEQ, VOCAB, SAMPLES, MICRO = 32, 256, 4, 2


def _case_tensors(batch, seq, heads, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads, head_dim, generator=g).to(device=device, dtype=dtype) for _ in range(3)]


def _attention_case(backend, dtype, device, head_dim, theta, phase, k_offset):
    """Max abs error of out, lse and the q/k/v gradients (loss through out and lse) vs float64."""
    from tapa_megatron.ops import tapa_attention

    q, k, v = _case_tensors(1, 80, 2, head_dim, dtype, device, seed=head_dim + int(theta * 100))
    q_pos = torch.arange(80, device=device) + 1_000_000  # far positions: the distance term must not lose bits
    k_pos = q_pos + k_offset  # k_offset > 0: the first queries see no key (out 0, lse -inf)
    g = torch.Generator().manual_seed(1)
    d_out = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    d_lse = torch.randn(1, 2, 80, generator=g).to(device)
    options = dict(theta=theta, phase=phase, q_pos=q_pos, k_pos=k_pos, return_lse=True)

    def run(tensors, which):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        out, lse = tapa_attention(*tensors, backend=which, **options)
        visible = torch.isfinite(lse)
        loss = (out.double() * d_out.double()).sum() + (torch.where(visible, lse, 0) * d_lse).double().sum()
        loss.backward()
        return out, lse, [t.grad for t in tensors]

    out, lse, grads = run((q, k, v), backend)
    _, _, grads_again = run((q, k, v), backend)
    ref_out, ref_lse, ref_grads = run([t.double() for t in (q, k, v)], "reference")
    finite = torch.isfinite(ref_lse)
    same_masking = bool(torch.equal(torch.isfinite(lse), finite))
    errors = {"out": (out.double() - ref_out).abs().max().item(),
              "lse": (lse.double() - ref_lse)[finite].abs().max().item(),
              **{f"d{n}": (a.double() - b).abs().max().item() for n, a, b in zip("qkv", grads, ref_grads)}}
    deterministic = all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    return errors, same_masking, deterministic


def _varlen_case(backend, dtype, device):
    """Packed documents of lengths 37, 64, 19 (partial tiles) against each document alone in float64."""
    from tapa_megatron.ops import tapa_attention, tapa_attention_varlen

    lengths = [37, 64, 19]
    q, k, v = (t[0] for t in _case_tensors(1, sum(lengths), 4, 64, dtype, device, seed=5))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out = tapa_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), backend=backend)
    worst = 0.0
    for i in range(len(lengths)):
        piece = slice(cu[i].item(), cu[i + 1].item())
        ref = tapa_attention(*(t[piece].double()[None] for t in (q, k, v)), backend="reference")[0]
        worst = max(worst, (out[piece].double() - ref).abs().max().item())
    return worst


def check_kernels(device):
    backend = "triton" if device.type == "cuda" else "torch"
    dtypes = {"fp32": (torch.float32, 1e-3), "bf16": (torch.bfloat16, 6e-2)} if device.type == "cuda" \
        else {"fp32": (torch.float32, 1e-3)}
    cases, ok = [], True
    for dtype_name, (dtype, tolerance) in dtypes.items():
        for head_dim in (64, 128):
            for theta in (0.25, 0.5):
                for phase in ("quadratic", "linear"):
                    errors, same_masking, deterministic = _attention_case(backend, dtype, device, head_dim, theta,
                                                                          phase, k_offset=3)
                    passed = same_masking and deterministic and max(errors.values()) <= tolerance
                    ok &= passed
                    cases.append(dict(dtype=dtype_name, head_dim=head_dim, theta=theta, phase=phase,
                                      max_abs_error=errors, no_key_rows_masked=same_masking,
                                      backward_bitwise_deterministic=deterministic, tolerance=tolerance,
                                      passed=passed))
        varlen_error = _varlen_case(backend, dtype, device)
        ok &= varlen_error <= tolerance
        cases.append(dict(dtype=dtype_name, varlen_max_abs_error=varlen_error, tolerance=tolerance,
                          passed=varlen_error <= tolerance))
    return dict(status="pass" if ok else "fail", backend=backend, cases=cases)


def _run_config(*overrides):
    from tapa_megatron.config import load_config
    from tapa_megatron.train import RunConfig

    return load_config(RunConfig, None, [f"data.seq_length={SEQ}", f"training.global_batch_size={SAMPLES}",
                                         f"training.micro_batch_size={MICRO}", "model.num_layers=2",
                                         "model.hidden_size=64", "model.num_attention_heads=4",
                                         "model.num_query_groups=2", "model.ffn_hidden_size=128", *overrides])


def _samples():
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(7))
    return [dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(SEQ)) for t in tokens]


def _model_and_engine(cfg, engine_class, dtype, device, seed=0):
    from tapa_megatron.model import build_gpt_model
    from tapa_megatron.train.trainer import run_transformer_config

    torch.manual_seed(seed)
    model = build_gpt_model(cfg.model, run_transformer_config(cfg, dtype), vocab_size=VOCAB,
                            max_sequence_length=SEQ).to(device)
    return model, engine_class(model, cfg, (SEQ, MICRO, cfg.model.hidden_size), dtype)


def _steps(engine, device, count):
    from tapa_megatron.train.batches import micro_batches

    cfg = engine.cfg
    return [engine.train_step(micro_batches(_samples(), 0, cfg.training, 1, 0, device)) for _ in range(count)]


def check_engines(device):
    if device.type != "cuda":
        return dict(status="skipped", reason="MegatronEngine needs CUDA (DDP buffers, distributed optimizer)")
    from tapa_megatron.train.engine import MegatronEngine, PortableEngine

    cfg = _run_config("optimizer.lr=1e-3", "optimizer.warmup_steps=0", "training.steps=4")
    runs = {}
    for name, engine_class in (("megatron", MegatronEngine), ("portable", PortableEngine)):
        _, engine = _model_and_engine(cfg, engine_class, torch.float32, device)
        runs[name] = [(r.loss, r.grad_norm) for r in _steps(engine, device, 4)]
    worst = max(abs(a - b) / max(abs(b), 1e-12) for m, p in zip(runs["megatron"], runs["portable"])
                for a, b in zip(m, p))
    return dict(status="pass" if worst <= 1e-5 else "fail", max_relative_difference=worst, tolerance=1e-5,
                steps=runs)


def check_extension(device):
    """Train a source, save, extend from it (weights only); the extension must start where it stopped."""
    from tapa_megatron.train import checkpoint
    from tapa_megatron.train.engine import MegatronEngine, PortableEngine

    build_engine = MegatronEngine if device.type == "cuda" else PortableEngine  # --cpu on a GPU machine too

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source_cfg = _run_config("optimizer.lr=1e-2", "optimizer.warmup_steps=0", "training.steps=12")
    model, engine = _model_and_engine(source_cfg, build_engine, dtype, device)
    source = [r.loss for r in _steps(engine, device, 10)]
    with tempfile.TemporaryDirectory() as run_dir:
        path = checkpoint.save_checkpoint(run_dir, 10, model, engine, 10 * SAMPLES, {}, report=lambda *_: None)
        at_saved_weights = _steps(engine, device, 1)[0].loss
        extend_cfg = _run_config("optimizer.lr=1e-5", "optimizer.warmup_steps=0", "training.steps=2")
        fresh, fresh_engine = _model_and_engine(extend_cfg, build_engine, dtype, device, seed=1)
        checkpoint.load_checkpoint(path, fresh, fresh_engine, with_optimizer=False, with_schedule=False,
                                   report=lambda *_: None)
        extension = [r.loss for r in _steps(fresh_engine, device, 2)]
    worst = max(abs(loss - at_saved_weights) / at_saved_weights for loss in extension)
    trained = (source[0] - at_saved_weights) / source[0]  # must exceed the tolerance, or the check proves nothing
    ok = worst <= 0.02 and trained > 0.1
    return dict(status="pass" if ok else "fail", engine=type(engine).__name__, dtype=str(dtype),
                source_losses=source, source_loss_at_saved_weights=at_saved_weights, extension_losses=extension,
                max_relative_difference=worst, tolerance=0.02, source_relative_improvement=trained)


def transfer_weights(source, target, directory):
    """source's weights into target through Megatron-Core's dist_checkpointing: saved under source's
    sharded keys, loaded under target's. This is how a spec maps onto another: the local spec's
    sharded_state_dict_keys_map names its input_layernorm / pre_mlp_layernorm as TE's fused
    linear_qkv.layer_norm_weight / linear_fc1.layer_norm_weight."""
    from megatron.core import dist_checkpointing

    from tapa_megatron.megatron_compat import save_strategy

    dist_checkpointing.save(source.sharded_state_dict(), str(directory), sharded_strategy=save_strategy())
    # TE's _extra_state (fp8 metadata) has no counterpart in the local model; the target keeps its own.
    wanted = {key: value for key, value in target.sharded_state_dict().items() if not key.endswith("_extra_state")}
    result = target.load_state_dict(dist_checkpointing.load(wanted, str(directory)), strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"the transfer left weights out: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, None, None).float()


def spec_transfer_case(position, dtype, device, use_transformer_engine):
    """A local-spec model's logits against a second model's (TE spec or local spec, same config, another
    seed) before and after transfer_weights: the largest difference over the largest logit."""
    from tapa_megatron.model import build_gpt_model
    from tapa_megatron.train.trainer import run_transformer_config

    cfg = _run_config(f"model.position={position}")

    def build(seed, te):
        torch.manual_seed(seed)
        return build_gpt_model(cfg.model, run_transformer_config(cfg, dtype), vocab_size=VOCAB,
                               max_sequence_length=SEQ, use_transformer_engine=te).to(device).eval()

    source, target = build(0, False), build(1, use_transformer_engine)
    with torch.no_grad():  # norms start at 1 in both models: moved off 1, a norm the transfer lost shows
        for name, param in source.named_parameters():
            if "layernorm" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator(device).manual_seed(len(name)))
    tokens = torch.stack([s["tokens"] for s in _samples()[:MICRO]]).to(device)
    expected = _logits(source, tokens)
    scale = expected.abs().max().item()
    before = (_logits(target, tokens) - expected).abs().max().item() / scale
    with tempfile.TemporaryDirectory() as directory:
        transfer_weights(source, target, directory)
    after = (_logits(target, tokens) - expected).abs().max().item() / scale
    attention = target.decoder.layers[0].self_attention
    return dict(position=position, dtype=str(dtype).removeprefix("torch."),
                target=f"{type(attention.linear_qkv).__name__} + {type(attention.core_attention).__name__}",
                relative_difference_before=before, relative_difference_after=after)


def check_transformer_engine(device, use_transformer_engine=True):
    """use_transformer_engine=False: the same transfer local spec -> local spec (the CPU tests' path)."""
    from tapa_megatron.model.specs import transformer_engine_available

    if use_transformer_engine and not (device.type == "cuda" and transformer_engine_available()):
        return dict(status="skipped", reason="Transformer Engine is not importable here, or no CUDA device")
    dtypes = {torch.float32: 1e-2, torch.bfloat16: 5e-2} if device.type == "cuda" else {torch.float32: 1e-5}
    cases, ok = [], True
    for position in ("tapa", "rope"):
        for dtype, tolerance in dtypes.items():
            case = spec_transfer_case(position, dtype, device, use_transformer_engine)
            # the models must differ before the transfer, or the check proves nothing
            case.update(tolerance=tolerance, passed=case["relative_difference_after"] <= tolerance
                        and case["relative_difference_before"] > 0.1)
            ok &= case["passed"]
            cases.append(case)
    return dict(status="pass" if ok else "fail", cases=cases)


def check_bench(device):
    import argparse

    from tapa_megatron.bench import attention as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    if device.type == "cuda":
        argv = ["--device", "cuda", "--seqlens", "8192", "16384", "--impls", "triton", "sdpa", "cudnn"]
    else:
        argv = ["--device", "cpu", "--seqlens", "256", "--impls", "torch", "sdpa", "--repeats", "1"]
    rows = bench.run(parser.parse_args(argv))
    by_seq = {}
    for row in rows:
        by_seq.setdefault(row.seq, {})[row.impl] = row.fwd_bwd_ms
    tapa_impl = "triton" if device.type == "cuda" else "torch"
    ratios = {seq: times[tapa_impl] / times["sdpa"] for seq, times in by_seq.items()
              if times.get(tapa_impl) and times.get("sdpa")}
    failed = [f"{row.impl} at {row.seq}: {row.note}" for row in rows if row.note.startswith("failed")]
    return dict(status="fail" if failed else "pass", **({"errors": failed} if failed else {}),
                rows=[dataclasses.asdict(row) for row in rows], tapa_over_sdpa_fwd_bwd_time=ratios)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions():
    import megatron.core

    versions = dict(python=platform.python_version(), torch=torch.__version__,
                    megatron_core=megatron.core.__version__)
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


def run(out, cpu=False, report=print):
    """Run every check (on CPU with cpu=True or without CUDA), write the JSON report; True when none failed."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    checks = {"kernels": check_kernels, "engines": check_engines, "extension": check_extension,
              "transformer_engine": check_transformer_engine, "bench": check_bench}
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  versions=_versions(), checks={})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        for name, check in checks.items():
            start = time.perf_counter()
            try:
                outcome = check(device)
            except Exception as err:  # a crash is a failed check, reported beside the others
                outcome = dict(status="fail", error=f"{type(err).__name__}: {err}")
            outcome["seconds"] = round(time.perf_counter() - start, 2)
            result["checks"][name] = outcome
            report(f"[selfcheck] {name}: {outcome['status']}"
                   + (f" ({outcome.get('reason') or outcome.get('error')})" if outcome['status'] != "pass" else "")
                   + f" in {outcome['seconds']} s")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(result, indent=2, default=lambda x: x if math.isfinite(x) else str(x)))
    report(f"[selfcheck] report: {out}")
    return all(c["status"] != "fail" for c in result["checks"].values())
