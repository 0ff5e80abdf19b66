"""The fused kernels compile for the H100 (sm_90) with their GPU-only parts, without a GPU.

The interpreter that runs the other kernel tests takes tl.cos / tl.sin instead of the FAST_MATH
inline PTX and does no software pipelining. scripts/compile_kernels.py compiles the kernels ahead
of time with Triton's bundled ptxas; it runs in a subprocess, since the kernels of this session are
already the interpreter's (TRITON_INTERPRET=1, tests/conftest.py) and the tool unsets that itself.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "scripts" / "compile_kernels.py"
# bf16 and fp32 (exact fp32 products on CUDA cores: other tiles), quadratic and linear phase.
SUBSET = ["--dtype", "bf16", "fp32", "--head-dim", "128", "--theta", "0.5", "--phase", "quadratic", "linear",
          "--causal", "yes"]


def missing_ptxas():
    """Why Triton cannot assemble for sm_90 here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except (ImportError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def test_kernels_compile_for_sm90_with_fast_trig_and_pipelined_loads():
    if reason := missing_ptxas():
        pytest.skip(f"Triton's bundled ptxas is missing, nothing can be assembled for sm_90 ({reason})")
    result = subprocess.run(
        [sys.executable, str(TOOL), *SUBSET, "--arch", "90", "--json"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout)
    assert report["target"] == "sm_90"
    rows = {(row["kernel"], row["config"]["dtype"], row["config"]["phase"]): row for row in report["rows"]
            if not row["kernel"].startswith("flash ")}  # the plain flash-attention baseline, same tiles
    assert {kernel for kernel, _, _ in rows} == {"fwd", "delta", "delta+dlse", "dkdv", "dq"}
    assert len(rows) == 2 * 2 + 2 * 2 * 3  # delta twice per dtype; three kernels per dtype and phase
    for (kernel, dtype, phase), row in rows.items():
        assert row["error"] is None, row["error"]
        assert row["registers"] > 0 and row["shared_bytes"] > 0
        if kernel.startswith("delta"):  # no trigonometry, no loop to pipeline
            continue
        where = f"{kernel} {dtype} {phase}"
        assert row["cos_approx"], f"{where}: FAST_MATH did not reach the PTX (cos.approx)"
        if kernel in ("dkdv", "dq"):
            assert row["sin_approx"], f"{where}: FAST_MATH did not reach the PTX (sin.approx)"
        if row["num_stages"] > 1:  # num_stages 1 (dK/dV at D = 128: registers) asks for no pipelining
            assert row["async_copies"] > 0, f"{where}: loads are not pipelined (no cp.async)"


# The gate on the report's configurations (docs/benchmarks.md): bf16, D = 64 and 128, theta 0.5, both
# phases, causal; the forward and both backward kernels, and the flash baseline on the same tiles.
CHECK_SUBSET = ["--dtype", "bf16", "--head-dim", "64", "128", "--theta", "0.5", "--causal", "yes"]


def test_check_gate_no_spills_serialized_wgmma_or_duplicated_warps():
    if reason := missing_ptxas():
        pytest.skip(f"Triton's bundled ptxas is missing, nothing can be assembled for sm_90 ({reason})")
    result = subprocess.run(
        [sys.executable, str(TOOL), *CHECK_SUBSET, "--arch", "90", "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-5000:]
