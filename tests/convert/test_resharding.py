"""Resharding through Megatron's dist_checkpointing: a TAPA model and its Adam state saved by two
tensor-parallel processes load at TP = 1 and at PP = 2 and carry on identically.

The oracle is the TP = 2 run itself: right after loading, the logits must equal those it had when it
saved; after one more optimizer step on the same batch they must equal its logits after that step, which
holds only if the Adam moments were resharded correctly (fresh moments give a different update).
"""

import pytest
import torch
import torch.distributed as dist

from tapa_megatron.convert.inspect_checkpoint import inspect_path

from tests.distributed import run_ranks

SEQ, VOCAB = 16, 256


def _run_config(run_dir, tensor, pipeline):
    from tapa_megatron.config import load_config
    from tapa_megatron.train import RunConfig

    return load_config(RunConfig, None, [
        f"run_dir={run_dir}", "model.position=tapa", "model.tapa.alpha=0.2", "model.num_layers=2",
        f"model.vocab_size={VOCAB}", f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
        f"data.seq_length={SEQ}", "training.steps=10", "training.global_batch_size=2", "training.micro_batch_size=1",
        "training.tensorboard=false", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
        "optimizer.decay_style=constant"])


def _batches(step):
    gen = torch.Generator().manual_seed(step)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (1, SEQ + 1), generator=gen)
        batches.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, SEQ)})
    return batches


def _logits(model, input_ids, hidden_size):
    """Full-vocabulary logits [b, s, v] on the last pipeline stage, None on the others."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(SEQ, input_ids.shape[0], hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(input_ids, None, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        shards = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(shards, dim=-1)


def _load_model_and_optimizer(path, model, engine):
    """Model weights and Adam state through dist_checkpointing, resharded to this process's layout.

    Not checkpoint.load_checkpoint: it also restores per-rank RNG states, stored per (pipeline, tensor,
    data) rank, which a different layout has no counterpart for (megatron-core refuses the load)."""
    from megatron.core import dist_checkpointing

    model_state = model.sharded_state_dict()
    state = {"model": model_state, "optimizer": engine.optimizer_sharded_state_dict(model_state, is_loading=True)}
    loaded = dist_checkpointing.load(state, str(path))
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    engine.load_optimizer_state_dict(loaded["optimizer"])


def _save_or_resume(rank, world_size, run_dir, tensor, pipeline, resume_from):
    """Without resume_from: build, take one step, save. With it: load model and optimizer state.
    Then: logits, one more step on the same batch, logits."""
    from megatron.core import parallel_state as ps

    from tapa_megatron.config import to_dict
    from tapa_megatron.model import build_gpt_model, transformer_config
    from tapa_megatron.train import checkpoint
    from tapa_megatron.train.engine import build_engine

    cfg = _run_config(run_dir, tensor, pipeline)
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline)
    try:
        torch.manual_seed(0)
        model = build_gpt_model(cfg.model, transformer_config(cfg.model, tensor_parallel=tensor,
                                                              pipeline_parallel=pipeline),
                                vocab_size=VOCAB, max_sequence_length=SEQ,
                                pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
        engine = build_engine(model, cfg, activation_shape=(SEQ, 1, cfg.model.hidden_size), dtype=torch.float32)
        if resume_from is None:
            engine.train_step(_batches(0))
            saved = checkpoint.save_checkpoint(run_dir, 1, model, engine, 2, to_dict(cfg), report=lambda _: None)
        else:
            _load_model_and_optimizer(resume_from, model, engine)
            saved = resume_from
        probe = _batches(99)[0]["tokens"]
        before = _logits(model, probe, cfg.model.hidden_size)
        engine.train_step(_batches(1))
        return str(saved), before, _logits(model, probe, cfg.model.hidden_size)
    finally:
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """Two tensor-parallel processes: one step, a checkpoint (with Adam state), another step."""
    ranks = run_ranks(2, _save_or_resume, tmp_path_factory.mktemp("tp2"), 2, 1, None)
    assert torch.equal(ranks[1][1], ranks[0][1])  # both tensor-parallel ranks gathered the same logits
    return ranks[0]


def test_tp2_checkpoint_resumes_at_tp1_and_pp2(tp2_run, tmp_path):
    path, before, after = tp2_run
    for tensor, pipeline in ((1, 1), (1, 2)):
        resumed = run_ranks(tensor * pipeline, _save_or_resume, tmp_path / f"tp{tensor}pp{pipeline}", tensor,
                            pipeline, path)
        _, resumed_before, resumed_after = resumed[-1]  # the last pipeline stage has the logits
        torch.testing.assert_close(resumed_before, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(resumed_after, after, rtol=1e-4, atol=1e-4)
    assert (after - before).abs().max() > 1e-2  # the step moved the model: the comparison has teeth


def test_inspect_describes_a_training_checkpoint(tp2_run):
    rows = dict(inspect_path(tp2_run[0]))
    assert rows["format"].startswith("Megatron-Core dist checkpoint (torch_dist)")
    assert rows["model"].startswith("2 layers, hidden 128, 4 heads / 2 key-value groups (head_dim 32), ffn 384, "
                                    "vocab 256, untied embeddings")
    assert rows["position"] == "tapa: alpha 0.2, theta 0.5 (16 amplitude + 16 phase dims per head), phase quadratic"
    assert rows["layout"].startswith("run layout tensor 2, pipeline 1, context 1; written by 2 processes; loads at "
                                     "tensor parallel [1, 2]")
    assert rows["step"] == "1 (2 samples consumed)"
    assert rows["contents"] == "model weights (float32), optimizer state"


def test_export_of_a_tp2_checkpoint_computes_its_logits(tp2_run, tmp_path):
    """megatron-to-hf reads the two-process checkpoint at TP = 1: the TapaLlama export computes the logits
    the TP = 2 model had when it saved."""
    from transformers import AutoModelForCausalLM

    from tapa_megatron.convert import megatron_to_hf

    path, before, _ = tp2_run
    megatron_to_hf.convert(path, tmp_path / "hf", report=lambda _: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(_batches(99)[0]["tokens"]).logits
    torch.testing.assert_close(logits, before, rtol=1e-5, atol=1e-5)
