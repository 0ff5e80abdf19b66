"""A run's configuration: what a recipe YAML holds, as typed dataclasses (see tapa_megatron.config)."""

from dataclasses import dataclass, field

from tapa_megatron.model import ModelConfig


@dataclass
class DataConfig:
    path: str = ""  # a directory made by `tapa data prepare` (tokenizer.json + train_text_document.bin/.idx)
    seq_length: int = 128
    split: str = "98,2,0"  # train, validation, test shares of the training documents
    seed: int = 1234


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    context_comm: str = "p2p"  # TAPA context parallelism: p2p (ring), all_gather or a2a (Ulysses)
    sequence_parallel: bool = False  # needs Transformer Engine (GPU)


@dataclass
class OptimizerConfig:
    lr: float = 2e-5  # the paper's TAPA peak lr at 7B (RoPE: 1e-4)
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of lr
    warmup_steps: int = 0
    decay_style: str = "cosine"  # cosine, linear, constant (Megatron's scheduler)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad: float = 1.0


@dataclass
class TrainingConfig:
    steps: int = 100  # length of the run (and of its lr schedule)
    exit_after_steps: int | None = None  # stop (with a checkpoint) after this many steps of this job
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    recompute: str | None = None  # None, "full" or "selective"
    log_every: int = 1
    tensorboard: bool = True
    skip_nonfinite_steps: int = 0  # NaN/Inf steps skipped (not applied, logged) per job before stopping (guard.py)
    eval_every: int = 0  # validation loss every this many steps and at the end (0: never); evaluate.py
    eval_iters: int = 4  # held-out global batches per validation (the same ones each time)
    grad_norm_groups: bool = False  # also record grad norms by parameter group at logged steps (grad_groups.py; CPU engine)


@dataclass
class CheckpointConfig:
    save_every: int = 0  # 0: only at the end
    keep: int = 2  # newest complete checkpoints kept
    resume: str = "auto"  # auto: continue from the newest complete checkpoint in the run dir; none
    init_from: str | None = None  # extension: load weights (only) from this checkpoint before step 0
    reset_optimizer: bool = True  # extension: start the optimizer and lr schedule afresh
    allow_mismatch: list[str] = field(default_factory=list)  # load anyway despite: tokenizer, position (compat.py)


@dataclass
class LoggingConfig:
    wandb: bool = False  # also log to Weights & Biases (pip install 'tapa-megatron[wandb]'; WANDB_MODE=offline works)
    wandb_project: str = "tapa-megatron"


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    description: str = ""
    sized_for: str = ""  # the hardware a recipe was sized for, e.g. "2 cores, CPU" or "64x H100 80GB"

    def __post_init__(self):
        t = self.training
        if t.micro_batch_size < 1 or t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                             f"training.micro_batch_size={t.micro_batch_size}.")
        if t.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"training.precision={t.precision!r} is unknown; use auto, bf16 or fp32.")
        if self.optimizer.decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"optimizer.decay_style={self.optimizer.decay_style!r} is unknown; "
                             "use cosine, linear or constant.")
        if t.steps > 0 and self.optimizer.warmup_steps >= t.steps:
            raise ValueError(f"optimizer.warmup_steps={self.optimizer.warmup_steps} must be below "
                             f"training.steps={t.steps}.")
        if t.eval_every < 0 or t.eval_iters < 1:
            raise ValueError(f"training.eval_every={t.eval_every} must be 0 (off) or more and "
                             f"training.eval_iters={t.eval_iters} at least 1.")
        if self.checkpoint.resume not in ("auto", "none"):
            raise ValueError(f"checkpoint.resume={self.checkpoint.resume!r} is unknown; use auto or none.")

    def data_parallel_size(self, world_size):
        p = self.parallel
        model_parallel = p.tensor * p.pipeline * p.context
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} does not factor into tensor ({p.tensor}) x pipeline ({p.pipeline}) x "
                f"context ({p.context}) x data parallel: launch a multiple of {model_parallel} processes.")
        data_parallel = world_size // model_parallel
        if self.training.global_batch_size % (self.training.micro_batch_size * data_parallel):
            raise ValueError(
                f"training.global_batch_size={self.training.global_batch_size} is not divisible by "
                f"micro_batch_size ({self.training.micro_batch_size}) x data parallel size ({data_parallel}).")
        return data_parallel
