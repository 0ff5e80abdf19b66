"""What differs between the megatron-core releases this project supports (0.16 through 0.19), in one
place. Everything else uses megatron-core's public API, which is the same across them.

    saving on CPU   Megatron's torch_dist writer pins memory and calls torch.cuda.synchronize() (0.16 in
                    its writer, 0.17+ in the preload of its synchronous save), which PyTorch cannot do
                    without a GPU. We write the same format synchronously with torch.distributed.checkpoint
                    (Megatron's loader reads it). `dist_checkpointing.save` takes any SaveShardedStrategy
                    in 0.16; 0.17 removed that base class and replaces every strategy that is not a
                    TorchDistSaveShardedStrategy with its own, so there ours is a subclass of that one.
"""

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

try:  # megatron-core <= 0.16
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy as _StrategyBase
    _BASE_ARGS = ("torch_dist", 1)
except ImportError:  # 0.17+
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy as _StrategyBase
    _BASE_ARGS = ()  # its defaults: backend torch_dist, version 1

__all__ = ["save_strategy"]


class SynchronousTorchDistSave(_StrategyBase):
    """Megatron's torch_dist format written synchronously with torch.distributed.checkpoint, without CUDA."""

    def __init__(self):
        super().__init__(*_BASE_ARGS)

    def save(self, sharded_state_dict, checkpoint_dir):
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(mcore_to_pyt_state_dict(state, False), storage_writer=dcp.FileSystemWriter(checkpoint_dir),
                 planner=MCoreSavePlanner(flatten_state_dict=False))

    def can_handle_sharded_objects(self):
        return True


def save_strategy():
    """The sharded_strategy for `dist_checkpointing.save`: None (Megatron's own writer) on a GPU machine,
    our synchronous writer of the same format on a CPU one."""
    return None if torch.cuda.is_available() else SynchronousTorchDistSave()
