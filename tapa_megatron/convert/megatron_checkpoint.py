"""The Megatron side of conversion: our GPTModel at TP = PP = 1 in this one process, and checkpoints
in the trainer's layout (tapa_megatron.train.checkpoint).

dist_checkpointing stores every tensor as a global tensor with shard metadata, so a checkpoint written
here by one process loads at any tensor/pipeline layout, and one saved at any layout loads here.
"""

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from tapa_megatron.config import ConfigError, from_dict
from tapa_megatron.convert import ConversionError
from tapa_megatron.model import ModelConfig, build_gpt_model, transformer_config
from tapa_megatron.train import checkpoint
from tapa_megatron.megatron_compat import save_strategy

EMBEDDING = "embedding.word_embeddings.weight"


@contextmanager
def single_process_megatron():
    """torch.distributed (gloo, a world of one) and Megatron's parallel state at TP = PP = 1."""
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group("gloo", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ConversionError(f"conversion runs in one process, but this one is part of a world of "
                              f"{dist.get_world_size()}; run `tapa convert` without torchrun/srun.")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def build_model(model_cfg, padded_vocab_size, dtype):
    """Our GPTModel, whole, with uninitialised weights (the caller fills every one). Call inside
    single_process_megatron()."""
    config = transformer_config(model_cfg, params_dtype=dtype, bf16=dtype == torch.bfloat16)
    config.perform_initialization = False
    # Positions enter in the core attention, not the embedding: the sequence length is not a model size.
    return build_gpt_model(model_cfg, config, vocab_size=padded_vocab_size, max_sequence_length=1)


def save_checkpoint(model, path, common_state):
    """Write model weights and common_state (config, train_state, ...) as a complete checkpoint into the
    empty directory `path`: Megatron's torch_dist files, then the trainer's completion marker."""
    dist_checkpointing.save({"model": model.sharded_state_dict(), **common_state}, str(path),
                            sharded_strategy=save_strategy())
    train_state = common_state["train_state"]
    marker = {"step": train_state["step"], "consumed_samples": train_state["consumed_samples"], "world_size": 1,
              "saved_at": time.time()}
    checkpoint.write_marker(path, marker, checkpoint.file_checksums(path))


def load_weights(model, path):
    """Load the model weights of checkpoint `path` (any layout it was saved at) into model."""
    checkpoint.load_checkpoint(path, model, engine=None, with_optimizer=False)


def model_config_of(common_state, path):
    """The ModelConfig a checkpoint's common state describes."""
    try:
        return from_dict(ModelConfig, common_state["config"]["model"], prefix="model.")
    except (KeyError, TypeError) as err:
        raise ConversionError(f"{path} has no model config (common state 'config' -> 'model'); it was not "
                              "written by tapa-megatron's trainer or converter.") from err
    except ConfigError as err:
        raise ConversionError(f"{path}: its model config does not load: {err}") from err


def stored_tensors(path):
    """{key: ShardedTensor} describing every tensor in the checkpoint (global shapes, dtypes), read from
    its metadata only."""
    return dist_checkpointing.load_tensors_metadata(str(path))


def read_checkpoint_info(path):
    """(checkpoint dir, common state, tensor metadata) of a checkpoint or a run directory's newest one."""
    try:
        path = checkpoint.resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ConversionError(str(err)) from None
    return path, checkpoint.load_common(path), stored_tensors(path)
