"""`tapa bench attention` on CPU: one row per length and implementation, every phase timed, and the
times consistent with each other (forward alone <= forward + backward; backward alone too)."""

import argparse

import pytest
import torch

from tapa_megatron.bench import attention


def bench_args(*argv):
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    return parser.parse_args(["--device", "cpu", *argv])


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded shared CPU, OpenMP threads that wait for a descheduled sibling
    stretch a sample many times over (fwd 220 ms, fwd+bwd 14 ms at seq 128 with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_table_shape_and_consistent_times(capsys, one_thread):
    seqlens, impls = [128, 256], ["torch", "sdpa"]
    rows = attention.run(bench_args("--seqlens", *map(str, seqlens), "--impls", *impls, "--heads", "4",
                                    "--kv-heads", "2", "--head-dim", "32", "--repeats", "10"))
    assert [(row.seq, row.impl) for row in rows] == [(seq, impl) for seq in seqlens for impl in impls]
    for row in rows:
        assert row.note == "", row.note
        assert 0 < row.fwd_ms <= row.fwd_bwd_ms, row
        assert 0 < row.bwd_ms <= row.fwd_bwd_ms, row
        assert row.peak_mib is None  # CUDA only
    table = capsys.readouterr().out.split("# TAPA attention benchmark")[1]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["seq", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s",
                      "peak MiB", "vs sdpa", "note"]
    assert len(lines) == 2 + len(rows)  # header, separator, one line per row
    assert all(line.count("|") == len(header) + 1 for line in lines)
    sdpa_ratio = [line for line in lines[2:] if "| sdpa " in line][0].split("|")[9].strip()
    assert sdpa_ratio == "1.00x"


def test_cudnn_needs_cuda():
    with pytest.raises(SystemExit, match="cudnn needs a CUDA device"):
        attention.run(bench_args("--seqlens", "128", "--impls", "cudnn"))
