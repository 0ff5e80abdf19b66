"""Training: the loop (trainer.py) and one module per concern beside it."""

from tapa_megatron.train.config import RunConfig
from tapa_megatron.train.trainer import TrainResult, train

__all__ = ["RunConfig", "TrainResult", "train"]
