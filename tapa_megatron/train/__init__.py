"""Training: the loop (trainer.py) and one module per concern beside it.

`from tapa_megatron.train import RunConfig, train` imports Megatron-Core (seconds); the plain-file
modules (checkpoint_layout, progress, summary) are imported alone by `tapa status`, so the package
itself loads those two names only when they are asked for."""

__all__ = ["RunConfig", "TrainResult", "train"]


def __getattr__(name):
    if name == "RunConfig":
        from tapa_megatron.train.config import RunConfig

        return RunConfig
    if name in ("TrainResult", "train"):
        from tapa_megatron.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tapa_megatron.train' has no attribute {name!r}")
