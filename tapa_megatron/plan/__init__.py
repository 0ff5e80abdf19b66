"""Planning a TAPA GPT run: memory per GPU and communication under TP x CP x PP x DP, from formulas.

    memory.py   parameters, gradients, optimizer state, activations (item by item), workspace
    comm.py     ring and tensor-parallel communication per layer; when the ring hides behind compute
    search.py   `plan`: the layouts of G GPUs that fit, best first; the longest sequence per GPU
    speed.py    step time and MFU of a layout at assumed rates (model FLOPs from tapa_megatron.model.flops)
    measure.py  predicted vs measured memory of real CPU runs (a live-tensor tracker)
    command.py  the `tapa plan` command (also `python -m tapa_megatron.plan`)

Nothing here imports megatron-core until a preset name is resolved or a run is measured.
"""

from tapa_megatron.plan.comm import overlap_threshold, ring_bytes, ring_step
from tapa_megatron.plan.memory import Layout, Memory, Step, layer_items, memory_per_gpu, parameters_per_gpu
from tapa_megatron.plan.search import Candidate, candidates, max_seq_len, plan

__all__ = ["Candidate", "Layout", "Memory", "Step", "candidates", "layer_items", "max_seq_len", "memory_per_gpu",
           "overlap_threshold", "parameters_per_gpu", "plan", "ring_bytes", "ring_step"]
