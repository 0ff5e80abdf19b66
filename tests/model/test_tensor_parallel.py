"""Tensor parallelism over real gloo processes: the TAPA GPT split over 2 ranks computes what 1 rank does."""

import torch

from tests.distributed import run_ranks


def _loss_and_grad_norms(rank, world_size, tensor_parallel, sequence_parallel):
    from megatron.core import parallel_state

    from tapa_megatron.model import ModelConfig, build_gpt_model, transformer_config

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    try:
        model_cfg = ModelConfig(preset="tiny")
        config = transformer_config(model_cfg, tensor_parallel=tensor_parallel, sequence_parallel=sequence_parallel)
        torch.manual_seed(1234)  # CPU initialisation draws every full weight, then keeps this rank's slice
        model = build_gpt_model(model_cfg, config, vocab_size=96, max_sequence_length=32)
        tokens = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
        loss = model(tokens, None, None, labels=tokens).mean()
        loss.backward()
        # the embedding is split by vocabulary: the squared norms of the slices add up
        squared = model.embedding.word_embeddings.weight.grad.square().sum()
        torch.distributed.all_reduce(squared, group=parallel_state.get_tensor_model_parallel_group())
        return loss.item(), squared.sqrt().item()
    finally:
        parallel_state.destroy_model_parallel()


def test_tp2_matches_single_process():
    # Sequence parallelism needs Transformer Engine's norms (GPU): Megatron's torch norms refuse it.
    single = run_ranks(1, _loss_and_grad_norms, 1, False)[0]
    for loss, grad_norm in run_ranks(2, _loss_and_grad_norms, 2, False):
        assert abs(loss - single[0]) < 1e-5, (loss, single)
        assert abs(grad_norm - single[1]) < 1e-5 * max(1.0, single[1])
