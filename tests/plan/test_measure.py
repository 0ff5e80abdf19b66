"""The memory model against memory measured in real CPU training steps, and the tracker that measures it."""

import torch

from tapa_megatron.plan.figure import draw_ring_schedule
from tapa_megatron.plan.measure import QUICK_CASES, LiveTensorBytes, validate

# Stored activations are counted item by item from what the code keeps, so they must match closely;
# the peak adds transient buffers, some of which (the CPU path's score tiles) the model approximates.
ACTIVATION_TOLERANCE = 0.01
PEAK_TOLERANCE = 0.03


def test_tracker_counts_storages_once_and_forgets_freed_ones():
    outside = torch.ones(1000)  # made before the mode: counts zero
    with LiveTensorBytes() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10]  # a view: no new storage
        b = outside * 2  # 4000 bytes
        assert tracker.live == 8000
        del b
        c = torch.empty(500, dtype=torch.float64)  # 4000 bytes, often at b's old address
        assert tracker.live == 8000
        del a, c
        assert tracker.live == 4000  # the view keeps a's storage alive
        del view
        assert tracker.live == 0
    assert tracker.peak == 8000


def test_predicted_memory_matches_measured_cpu_runs():
    rows = validate(QUICK_CASES)
    assert len(rows) == len(QUICK_CASES)
    for row in rows:
        assert abs(row.activation_error) < ACTIVATION_TOLERANCE, row
        assert abs(row.peak_error) < PEAK_TOLERANCE, row
        assert row.measured_peak > row.measured_activations > 0


def test_ring_figure_is_small(tmp_path):
    path = tmp_path / "ring.png"
    draw_ring_schedule(path)
    assert 10_000 < path.stat().st_size < 150_000
