"""What differs between the megatron-core releases this project supports (0.16 through 0.19), in one
place. Everything else uses megatron-core's public API, which is the same across them.

    saving on CPU   0.16's torch_dist writer pins memory and calls torch.cuda.synchronize(), which a
                    CPU-only PyTorch cannot, and `dist_checkpointing.save` takes any SaveShardedStrategy:
                    we pass our synchronous writer of the same format. 0.17+ removed the strategy base
                    class and replaces any other strategy with its own TorchDistSaveShardedStrategy,
                    whose synchronous save runs on CPU.
"""

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

try:  # megatron-core <= 0.16
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
except ImportError:  # 0.17+
    SaveShardedStrategy = None

__all__ = ["save_strategy"]

if SaveShardedStrategy is not None:
    class SynchronousTorchDistSave(SaveShardedStrategy):
        """Megatron's torch_dist format written synchronously with torch.distributed.checkpoint, without
        CUDA (Megatron's loader reads it)."""

        def __init__(self):
            super().__init__("torch_dist", 1)

        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            dcp.save(mcore_to_pyt_state_dict(state, False), storage_writer=dcp.FileSystemWriter(checkpoint_dir),
                     planner=MCoreSavePlanner(flatten_state_dict=False))

        def can_handle_sharded_objects(self):
            return True


def save_strategy():
    """The sharded_strategy for `dist_checkpointing.save`: None (Megatron's default) where Megatron's own
    writer runs, our synchronous one on a CPU machine with megatron-core 0.16."""
    if torch.cuda.is_available() or SaveShardedStrategy is None:
        return None
    return SynchronousTorchDistSave()
