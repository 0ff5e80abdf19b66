"""The training loop. Reads top to bottom: parallel setup, tokenizer and model, optimizer engine,
resume or extension start, data, then steps with logging and checkpoints.

    from tapa_megatron.train import train
    result = train(run_config)      # in every rank of a torchrun / srun / MPI / spawn launch, or alone
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tapa_megatron.config import dump_yaml, to_dict
from tapa_megatron.data.dataset import build_datasets
from tapa_megatron.data.tokenizer import load_tokenizer
from tapa_megatron.model import build_gpt_model, transformer_config
from tapa_megatron.model.flops import training_flops_per_token
from tapa_megatron.train import checkpoint, compat, summary
from tapa_megatron.train.batches import micro_batches
from tapa_megatron.train.distributed import setup_parallel, teardown_parallel
from tapa_megatron.train.engine import build_engine
from tapa_megatron.train.evaluate import validation_loss
from tapa_megatron.train.guard import NonFiniteGuard
from tapa_megatron.train.metrics import Metrics, wandb_run

VOCAB_MULTIPLE = 128  # the embedding is padded so every tensor-parallel rank gets an equal, aligned slice


@dataclass
class TrainResult:
    losses: list  # (step, loss, grad_norm) for every step this call ran
    final_checkpoint: Path | None
    start_step: int
    preempted: bool = False  # stopped early on stop_requested, with a checkpoint: run again to continue
    validation: list = field(default_factory=list)  # (step, validation loss) for every evaluation this call ran
    grad_norm_groups: list = field(default_factory=list)  # (step, {group: norm}) at logged steps (grad_norm_groups)


def padded_vocab_size(vocab_size, tensor_parallel):
    multiple = VOCAB_MULTIPLE * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def _precision(cfg):
    bf16 = cfg.training.precision == "bf16" or (cfg.training.precision == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if bf16 else torch.float32


def run_transformer_config(cfg, dtype):
    """Megatron's TransformerConfig for this run's model and layout. Sequence parallelism splits the
    tensor-parallel region, so it is on only where TP > 1 (TransformerConfig refuses it at TP = 1)."""
    p = cfg.parallel
    return transformer_config(cfg.model, tensor_parallel=p.tensor, pipeline_parallel=p.pipeline,
                              context_parallel=p.context, cp_comm_type=p.context_comm,
                              sequence_parallel=p.sequence_parallel and p.tensor > 1, params_dtype=dtype,
                              bf16=dtype == torch.bfloat16, recompute=cfg.training.recompute)


def train(cfg, report=print, stop_requested=None):
    """Train cfg. stop_requested: polled once per step (e.g. set by a preemption signal); when it is true
    on any rank, every rank stops after the same step, checkpoints, and the result says preempted."""
    env = setup_parallel(cfg)
    say = report if env.is_logging_rank else (lambda *_: None)
    try:
        return _train(cfg, env, say, stop_requested)
    finally:
        teardown_parallel()


def _on_any_rank(flag, device):
    """flag OR-ed over all ranks (one all_reduce), so every rank takes the same branch."""
    flags = torch.tensor([int(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def _train(cfg, env, say, stop_requested):
    run_dir = Path(cfg.run_dir)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    dist.barrier()

    # Model for this pipeline stage. Weights are drawn on CPU from one seed, whatever the layout.
    tokenizer = load_tokenizer(Path(cfg.data.path) / "tokenizer.json")
    vocab_size = padded_vocab_size(cfg.model.vocab_size or tokenizer.vocab_size, cfg.parallel.tensor)
    dtype = _precision(cfg)
    config = run_transformer_config(cfg, dtype)
    torch.manual_seed(cfg.training.seed)
    model = build_gpt_model(cfg.model, config, vocab_size=vocab_size, max_sequence_length=cfg.data.seq_length,
                            pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage()).to(env.device)
    seq, micro = cfg.data.seq_length, cfg.training.micro_batch_size
    local_seq = seq // cfg.parallel.context  # each context-parallel rank holds 1/CP of every sequence
    engine = build_engine(model, cfg, activation_shape=(local_seq, micro, cfg.model.hidden_size), dtype=dtype)

    # Where to start: the run's own newest checkpoint, else (extension) another run's weights, else step 0.
    start_step = 0
    latest = checkpoint.latest_verified_checkpoint(checkpoint.checkpoint_root(run_dir), report=say) \
        if cfg.checkpoint.resume == "auto" else None
    if latest is not None:
        for line in compat.check(compat.from_checkpoint(latest), cfg, tokenizer, vocab_size, "resume"):
            say(line)
        start_step = checkpoint.load_checkpoint(latest, model, engine, report=say)["step"]
        say(f"[resume] continuing from {latest} at step {start_step}")
    elif cfg.checkpoint.init_from:
        source = checkpoint.resolve_verified(cfg.checkpoint.init_from)
        for line in compat.check(compat.from_checkpoint(source), cfg, tokenizer, vocab_size, "extend"):
            say(line)
        say(f"[extend] starting from {source}")
        checkpoint.load_checkpoint(source, model, engine, with_optimizer=not cfg.checkpoint.reset_optimizer,
                                   with_schedule=False, report=say)
        if cfg.checkpoint.reset_optimizer:
            say("[extend] weights loaded; optimizer and lr schedule start afresh")

    # Data: every step's global batch is fixed by the step number, so resuming needs no data state.
    t = cfg.training
    samples = max(t.steps * t.global_batch_size, 1)
    if env.rank != 0:
        dist.barrier()  # rank 0 writes megatron's index cache first; the others then read it
    valid_samples = t.eval_iters * t.global_batch_size if t.eval_every else 1
    train_ds, valid_ds = build_datasets(cfg.data.path, tokenizer, seq, cfg.data.seed, samples, valid_samples,
                                        split=cfg.data.split)
    if t.eval_every and valid_ds is None:
        raise SystemExit(f"training.eval_every={t.eval_every} needs a validation share in data.split "
                         f"(now {cfg.data.split!r}), e.g. data.split=98,2,0; or set training.eval_every=0.")
    if env.rank == 0:
        dist.barrier()

    tokens_per_step = t.global_batch_size * seq
    num_params = cfg.model.num_parameters(vocab_size)
    metrics = Metrics(run_dir, t.steps, tokens_per_step,
                      tokens_per_step * training_flops_per_token(cfg.model, seq, vocab_size).total,
                      env.world_size, enabled=env.is_logging_rank, tensorboard=t.tensorboard,
                      wandb=wandb_run(cfg.logging, run_dir, cfg.name, to_dict(cfg)) if env.is_logging_rank else None)
    say(f"[train] {cfg.name}: {num_params / 1e6:.2f}M parameters, {cfg.model.position}, seq {seq}, "
        f"global batch {t.global_batch_size}, world {env.world_size} (tp {cfg.parallel.tensor}, "
        f"pp {cfg.parallel.pipeline}, cp {cfg.parallel.context}, dp {env.data_parallel_size}), "
        f"steps {start_step}..{t.steps}")

    last_step = t.steps if t.exit_after_steps is None else min(t.steps, start_step + t.exit_after_steps)
    if latest is not None and start_step >= t.steps:
        checkpoint.finish_rotation(run_dir, start_step, cfg.checkpoint.keep, report=say)
        say(summary.already_finished_line(cfg.name, t.steps, latest))
        metrics.close()
        return TrainResult(losses=[], final_checkpoint=latest, start_step=start_step)

    def evaluate(step):
        loss = validation_loss(engine, model, valid_ds, cfg, env)
        validation.append((step, loss))
        metrics.log_validation(step, loss)
        if env.is_logging_rank:
            summary.record_validation(run_dir, step, loss)

    validation = []
    started = time.perf_counter()
    guard, identity = NonFiniteGuard(cfg, env.device, report=say), compat.identity(tokenizer, vocab_size)
    losses, grad_norm_groups = [], []
    preempted = False
    metrics.start()
    since_log = 0
    for step in range(start_step, last_step):
        batches = micro_batches(train_ds, step, t, env.data_parallel_size, env.data_parallel_rank, env.device,
                                context_parallel=cfg.parallel.context)
        result = engine.train_step(batches)
        guard.check(step + 1, result)  # a NaN/Inf step stops the run here, before anything is saved
        losses.append((step, result.loss, result.grad_norm))
        since_log += 1
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            metrics.log(done, result.loss, result.lr, result.grad_norm, since_log)
            since_log = 0
            if result.grad_norms is not None:
                grad_norm_groups.append((done, result.grad_norms))
        if stop_requested is not None and done < last_step and _on_any_rank(stop_requested(), env.device):
            say(f"[preempt] stop requested: every rank stops after step {done} and checkpoints it")
            last_step, preempted = done, True
            break
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
            evaluate(done)
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 and done < last_step:
            checkpoint.save_checkpoint(run_dir, done, model, engine, done * t.global_batch_size, to_dict(cfg),
                                       keep=cfg.checkpoint.keep, report=say, identity=identity)
    final = checkpoint.save_checkpoint(run_dir, last_step, model, engine, last_step * t.global_batch_size,
                                       to_dict(cfg), keep=cfg.checkpoint.keep, report=say, identity=identity)
    if last_step < t.steps:
        reason = "preempted" if preempted else "training.exit_after_steps"
        say(f"[train] stopped after step {last_step} of {t.steps} ({reason}); "
            "run again with checkpoint.resume=auto to continue")
    if env.is_logging_rank:
        for line in summary.summary_lines(cfg.name, start_step, last_step, t.steps, tokens_per_step,
                                          time.perf_counter() - started, losses[-1][1] if losses else None,
                                          run_dir, final):
            say(line)
    metrics.close()
    return TrainResult(losses=losses, final_checkpoint=final, start_step=start_step, preempted=preempted,
                       validation=validation, grad_norm_groups=grad_norm_groups)
