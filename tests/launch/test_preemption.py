"""The trainer's stop hook on real gloo ranks: a stop that only one rank sees still stops every rank after
the same step, with one complete checkpoint, and the next run resumes there."""

import torch

from tapa_megatron.train.checkpoint import is_complete
from tests.distributed import run_ranks
from tests.train.test_trainer import run_config


class StopOnOneRank:
    """stop_requested for train(): true on `rank` from its `after`-th poll on (as if only it got SIGUSR1)."""

    def __init__(self, rank, after):
        self.rank, self.after, self.polls = rank, after, 0

    def __call__(self):
        self.polls += 1
        return torch.distributed.get_rank() == self.rank and self.polls >= self.after


def _stop_then_resume(rank, world_size, cfg, stop_requested):
    """Train until stopped, then run the same config again (resume=auto), in the same processes."""
    from tapa_megatron.train import train

    runs = [train(cfg, stop_requested=stop_requested), train(cfg)]
    return [(run.preempted, [step for step, _, _ in run.losses], str(run.final_checkpoint)) for run in runs]


def test_a_stop_seen_by_one_rank_stops_every_rank_after_the_same_step(novels_data, tmp_path):
    cfg = run_config(tmp_path, novels_data)  # 4 steps; 2 data-parallel ranks below
    rank0, rank1 = run_ranks(2, _stop_then_resume, cfg, StopOnOneRank(rank=1, after=2))
    assert rank0 == rank1
    (preempted, steps, checkpoint), (resumed_preempted, resumed_steps, final) = rank0
    assert preempted and steps == [0, 1] and checkpoint == str(tmp_path / "checkpoints" / "step_00000002")
    assert is_complete(checkpoint)
    assert not resumed_preempted and resumed_steps == [2, 3]
    assert final == str(tmp_path / "checkpoints" / "step_00000004")
