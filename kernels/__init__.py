"""Fused Triton kernels for TAPA attention (imported as `tapa_kernels`).

Plain launchers over the packed (varlen) layout; autograd lives in `tapa_megatron.ops.triton`.
"""

from tapa_kernels.tapa_bwd import tapa_bwd
from tapa_kernels.tapa_fwd import tapa_fwd

__all__ = ["tapa_fwd", "tapa_bwd"]
