"""`tapa selfcheck --cpu` runs in CI so that it cannot rot; its extension check fails on a lost load."""

import json
import subprocess
import sys

from tests.distributed import run_ranks


def test_selfcheck_cpu_writes_a_passing_report(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "tapa_megatron.cli", "selfcheck", "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert checks["kernels"]["status"] == "pass" and len(checks["kernels"]["cases"]) == 9
    assert checks["engines"]["status"] == "skipped" and "CUDA" in checks["engines"]["reason"]
    assert checks["extension"]["status"] == "pass" and checks["extension"]["source_relative_improvement"] > 0.1
    bench = checks["bench"]
    assert bench["status"] == "pass" and {row["impl"] for row in bench["rows"]} == {"torch", "sdpa"}
    assert all(row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in bench["rows"])
    (ratio,) = bench["tapa_over_sdpa_fwd_bwd_time"].values()
    torch_row, sdpa_row = sorted(bench["rows"], key=lambda row: row["impl"] != "torch")
    assert ratio == torch_row["fwd_bwd_ms"] / sdpa_row["fwd_bwd_ms"]
    assert report["versions"]["megatron_core"].startswith("0.")


def _extension_without_load(rank, world_size):
    import torch
    from megatron.core import parallel_state

    from tapa_megatron import selfcheck
    from tapa_megatron.train import checkpoint

    parallel_state.initialize_model_parallel()
    try:
        checkpoint.load_checkpoint = lambda *args, **kwargs: None  # the weights never arrive
        return selfcheck.check_extension(torch.device("cpu"))
    finally:
        parallel_state.destroy_model_parallel()


def test_extension_check_fails_when_the_weights_are_lost():
    outcome = run_ranks(1, _extension_without_load)[0]
    assert outcome["status"] == "fail" and outcome["max_relative_difference"] > 0.1
