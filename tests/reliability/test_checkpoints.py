"""Damaged checkpoints and a full disk: a corrupted or truncated newest shard is found by its checksum,
reported, and the run falls back to the newest checkpoint that verifies and ends bit-identical to an
uninterrupted run, deleting nothing; a disk too small for the next checkpoint stops the run with the
cause named, its own partial files removed, and the rerun (with space) resumes exactly."""

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tapa_megatron import cli
from tapa_megatron.train import checkpoint
from tests.reliability import child, forked
from tests.reliability.conftest import SWEEP, assert_same_tensors, copy_run, file_states, tiny_config

SHARD = "__0_0.distcp"


def flip_bytes(path, offset=4096, count=16):
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = bytes(255 - b for b in data[offset:offset + count])
    path.write_bytes(bytes(data))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {"corrupted": (flip_bytes, "does not match its SHA-256"), "truncated": (truncate, "(truncated?)")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(damage, pretrained, reference, novels_data,
                                                                     tmp_path):
    run_dir = copy_run(pretrained, tmp_path / "run")
    newest = checkpoint.checkpoint_root(run_dir) / "step_00000004"
    harm, symptom = DAMAGE[damage]
    harm(newest / SHARD)
    damaged_bytes = (newest / SHARD).read_bytes()

    run = forked.run(child.train, tiny_config(run_dir, novels_data, *SWEEP)).result()
    log = "\n".join(run["log"])
    assert f"{newest} is damaged: {SHARD}" in log and symptom in log
    assert "falling back to step_00000002" in log and run["start_step"] == 2
    assert run["losses"] == reference["losses"][2:]
    assert_same_tensors(run["final"], reference["tensors"], tmp_path / "final.pt")
    # Nothing was deleted: when the run came to save step 4 again, the damaged one was set aside.
    aside = newest.with_name("step_00000004.damaged")
    assert (aside / SHARD).read_bytes() == damaged_bytes
    assert "set aside as step_00000004.damaged" in log
    assert checkpoint.verify(newest) == []


def test_when_no_checkpoint_verifies_the_run_stops_and_deletes_nothing(pretrained, novels_data, tmp_path):
    run_dir = copy_run(pretrained, tmp_path / "run")
    root = checkpoint.checkpoint_root(run_dir)
    flip_bytes(root / "step_00000004" / SHARD)
    truncate(root / "step_00000002" / SHARD)  # common.pt exists only before megatron-core 0.17
    before = file_states(run_dir)
    run = forked.run(child.train, tiny_config(run_dir, novels_data, *SWEEP)).result()
    assert run["error"].startswith(f"no checkpoint in {root} verifies (step_00000004, step_00000002: damaged")
    assert "nothing was deleted" in run["error"]
    after = file_states(run_dir)
    assert {path: state for path, state in after.items() if "/checkpoints/" in path} == \
        {path: state for path, state in before.items() if "/checkpoints/" in path}


def test_extension_from_a_damaged_checkpoint_is_refused(pretrained, novels_data, tmp_path):
    source = copy_run(pretrained, tmp_path / "source")
    flip_bytes(checkpoint.checkpoint_root(source) / "step_00000004" / SHARD)
    cfg = tiny_config(tmp_path / "ext", novels_data, "training.steps=2", f"checkpoint.init_from={source}")
    run = forked.run(child.train, cfg).result()
    assert run["error"].startswith("checkpoint.init_from: ") and "step_00000004 is damaged" in run["error"]
    assert f"name an older checkpoint directory ({source}/checkpoints/step_N)" in run["error"]


def test_inspect_verify(pretrained, tmp_path, capsys):
    cli.main(["convert", "inspect", "--verify", str(pretrained)])
    newest = checkpoint.checkpoint_root(pretrained) / "step_00000004"
    n_files = sum(1 for f in newest.iterdir() if f.name != "tapa_complete.json")  # 4 before megatron-core 0.17, 3 after
    assert f"verify    ok: all {n_files} files match the sizes and SHA-256 sums in tapa_complete.json" in capsys.readouterr().out
    damaged = copy_run(checkpoint.checkpoint_root(pretrained) / "step_00000002", tmp_path / "step_00000002")
    truncate(damaged / SHARD)
    with pytest.raises(SystemExit) as failed:
        cli.main(["convert", "inspect", "--verify", str(damaged)])
    assert str(failed.value.code).startswith(f"tapa convert inspect: {damaged} is damaged: {SHARD} has ")


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for one checkpoint of the tiny model (7.7 MB) but not two."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full filesystem is a small tmpfs, which only root can mount")
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _train_without_space_check(cfg):
    """As child.train, with the up-front free-space check off: the write itself runs out of space."""
    checkpoint._check_space = lambda *args: None
    return child.train(cfg)


def test_full_disk_names_the_cause_cleans_up_and_the_rerun_resumes_exactly(small_disk, reference, novels_data):
    run_dir = small_disk / "run"
    cfg = tiny_config(run_dir, novels_data, *SWEEP, "checkpoint.keep=1")
    root = checkpoint.checkpoint_root(run_dir)

    refused = forked.run(child.train, cfg).result()  # step 2 fits; step 4 would not: refused before writing
    assert refused["error"].startswith("checkpoint step_00000004 needs about ")
    assert "nothing was written" in refused["error"] and "lower checkpoint.keep (now 1" in refused["error"]
    assert "the same command then resumes from step_00000002" in refused["error"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    good = file_states(root / "step_00000002")

    failed = forked.run(_train_without_space_check, cfg).result()  # now the write itself fails
    assert failed["error"].startswith(f"no space left on the filesystem of {root} while writing checkpoint "
                                      "step_00000004")
    assert "its partial files were removed" in failed["error"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no .partial left
    assert file_states(root / "step_00000002") == good and checkpoint.verify(root / "step_00000002") == []

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)  # space is freed
    resumed = forked.run(child.train, cfg).result()
    assert resumed["start_step"] == 2 and resumed["losses"] == reference["losses"][2:]
    assert_same_tensors(resumed["final"], reference["tensors"], Path(small_disk) / "final.pt")
