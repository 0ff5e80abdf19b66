"""`tapa study --quick` end to end: two variants, their group grad norms against the trainer's total, resume."""

import json
import math
import shutil
import subprocess
import sys

import pytest

VARIANTS = ["tapa lr 2e-3", "nope lr 2e-3"]


def study(out):
    return subprocess.run([sys.executable, "-m", "tapa_megatron.cli", "study", "--quick", "--out", str(out),
                           "--only", *VARIANTS], capture_output=True, text=True, timeout=900)


def test_study_quick_records_variants_and_resumes(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("the study's corpus comes from Debian packages via `apt-get download`; apt-get is not on PATH")
    out = tmp_path / "study"
    run = study(out)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == VARIANTS
    for name, r in results.items():
        assert len(r["ppl"]) == 3 and all(math.isfinite(p) and p > 1 for p in r["ppl"]), name
        groups = r["grad_norm_groups"]
        assert ("qk phase" in groups) == name.startswith("tapa")
        for i, step in enumerate(groups["steps"]):  # the groups partition the parameters: squares add up
            squares = sum(norms[i] ** 2 for group, norms in groups.items() if group != "steps")
            assert squares == pytest.approx(r["grad_norm"][step - 1] ** 2, rel=1e-4), (name, step)
    for png in ("grad_norm.png", "perplexity.png", "grad_norm_groups.png"):
        assert (out / png).stat().st_size > 10_000
    before = (out / "results.json").read_text()
    again = study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": in ") == 2 and "skipped" in again.stdout
    assert (out / "results.json").read_text() == before
    assert "| tapa lr 2e-3 |" in again.stdout  # the tables are printed from results.json
