"""The engines against independent oracles: Megatron-Core's own schedule with our forward step and loss
function gives the single-process gradients at CP=2 and DP=2 (gloo), and at PP=2 with tied embeddings;
the LR schedule after resume and after init_from is the recipe's; a weights-only load refreshes the
optimizer's copies of the weights."""

import inspect
import math

import pytest
import torch

from tapa_megatron.config import load_config
from tapa_megatron.train import RunConfig
from tests.distributed import run_ranks

SEQ, VOCAB, SAMPLES, MICRO = 16, 256, 4, 1
LAYOUTS = {"cp2": dict(context_parallel_size=2), "dp2": {}}


def _cfg(*overrides):
    return load_config(RunConfig, None, [f"data.seq_length={SEQ}", f"training.global_batch_size={SAMPLES}",
                                         f"training.micro_batch_size={MICRO}", "model.num_layers=2", *overrides])


def _samples():
    """A fixed global batch: random tokens, the next token as label, every token counted."""
    tokens = torch.randint(0, VOCAB, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(7))
    return [dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(SEQ)) for t in tokens]


def _model(cfg, context_parallel=1):
    from tapa_megatron.model import build_gpt_model, transformer_config

    torch.manual_seed(0)  # the same weights in every process
    config = transformer_config(cfg.model, context_parallel=context_parallel)
    return build_gpt_model(cfg.model, config, vocab_size=VOCAB, max_sequence_length=SEQ)


def _reference_gradients(rank, world_size, overrides=(), save_to=None):
    """The oracle: one process, plain autograd, mean over micro-batches of each one's mean token loss.
    save_to: also save the weights there (Megatron's dist_checkpointing) for another layout to load."""
    from megatron.core import dist_checkpointing, parallel_state

    from tapa_megatron.megatron_compat import save_strategy

    parallel_state.initialize_model_parallel()
    try:
        model = _model(_cfg(*overrides))
        if save_to is not None:
            dist_checkpointing.save(model.sharded_state_dict(), str(save_to), sharded_strategy=save_strategy())
        samples = _samples()
        for start in range(0, SAMPLES, MICRO):
            batch = {k: torch.stack([s[k] for s in samples[start:start + MICRO]]) for k in samples[0]}
            per_token = model(batch["tokens"], None, None, labels=batch["labels"])
            (per_token.float().mean() / (SAMPLES // MICRO)).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        parallel_state.destroy_model_parallel()


def _engine_gradients(rank, world_size, layout):
    """PortableEngine's forward/backward: Megatron's forward_backward_no_pipelining, step.py's forward
    step and loss, finalize_model_grads; plus the pipeline tensor shape Megatron's schedules would use."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import get_tensor_shapes

    from tapa_megatron.train import engine as engines
    from tapa_megatron.train.batches import micro_batches

    parallel_state.initialize_model_parallel(**LAYOUTS[layout])
    try:
        cp = parallel_state.get_context_parallel_world_size()
        dp = parallel_state.get_data_parallel_world_size()
        cfg = _cfg(f"parallel.context={cp}")
        model = _model(cfg, context_parallel=cp)
        engine = engines.PortableEngine(model, cfg, activation_shape=(SEQ // cp, MICRO, model.config.hidden_size),
                                        dtype=torch.float32)
        batches = micro_batches(_samples(), 0, cfg.training, dp, parallel_state.get_data_parallel_rank(), "cpu",
                                context_parallel=cp)
        logs = engine.forward_backward(batches)
        seq_length, micro_batch_size = engines._schedule_lengths(cfg)
        shapes = get_tensor_shapes(seq_length=seq_length, micro_batch_size=micro_batch_size, decoder_seq_length=None,
                                   config=model.config, tp_group=parallel_state.get_tensor_model_parallel_group(),
                                   cp_group=parallel_state.get_context_parallel_group())
        local_activation = (batches[0]["tokens"].shape[1], MICRO, model.config.hidden_size)
        loss = engines.step.global_mean_loss(logs, "cpu")
        return {name: p.grad.clone() for name, p in model.named_parameters()}, loss, shapes, local_activation
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _reference_gradients)[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_schedule_gives_single_process_gradients(layout, reference):
    """Bug 3: a 2-tuple (mean) loss is multiplied by the CP size in Megatron's schedule: 2x at CP=2."""
    for grads, loss, shapes, local_activation in run_ranks(2, _engine_gradients, layout):
        assert grads.keys() == reference.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7, msg=f"{layout}: {name}")
        assert math.isfinite(loss) and 4.0 < loss < 8.0  # about ln(256) = 5.5 at init
        # Bug 5: the shape Megatron's pipeline schedules size their buffers with is the stage's real output.
        assert shapes == [local_activation]


def test_global_loss_is_reduced_on_the_collectives_device(megatron_single_rank):
    """Bug 1: on GPU the loss logs are CUDA tensors and NCCL reduces CUDA tensors; the totals must be made
    and reduced there (the first version added a CPU tensor to a CUDA one and crashed every step).
    FakeTensorMode gives CUDA tensors on a CPU machine and refuses mixed devices as CUDA does; the
    collectives run their meta kernels on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tapa_megatron.train import step

    with FakeTensorMode():
        logs = [step.loss_func(torch.ones(MICRO, SEQ, device="cuda"), torch.rand(MICRO, SEQ, device="cuda"))[2]
                for _ in range(2)]
        assert logs[0]["lm loss"].device.type == "cuda"
        totals = step.global_token_totals(logs, device="cuda")
    assert totals.device.type == "cuda" and totals.dtype == torch.float64
    # The numbers, on CPU: the mean over every counted token (float64 oracle), masked tokens left out.
    per_token = torch.rand(2, MICRO, SEQ, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, MICRO, SEQ)
    mask[1, :, SEQ // 2:] = 0
    logs = [step.loss_func(mask[i], per_token[i])[2] for i in range(2)]
    expected = per_token.double()[mask.bool()].mean().item()
    assert step.global_mean_loss(logs, device="cpu") == pytest.approx(expected, rel=1e-6)


def _scheduler(cfg):
    from tapa_megatron.train.engine import lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = lr_scheduler(optimizer, cfg)
    scheduler.step(0)
    return scheduler, optimizer


def test_resumed_lr_schedule_is_the_recipes():
    """Bug 6: resuming with another lr / length follows the new recipe (Megatron's own scheduler, stepped
    from 0 without a checkpoint, is the oracle); only the step count comes from the checkpoint."""
    old, _ = _scheduler(_cfg("optimizer.lr=4e-4", "training.steps=10", "optimizer.warmup_steps=2"))
    for _ in range(5):
        old.step(1)
    new_cfg = _cfg("optimizer.lr=2e-4", "training.steps=20", "optimizer.warmup_steps=2")
    resumed, resumed_opt = _scheduler(new_cfg)
    resumed.load_state_dict(old.state_dict())
    fresh, fresh_opt = _scheduler(new_cfg)
    for _ in range(5):
        fresh.step(1)
    assert resumed.num_steps == 5
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(fresh_opt.param_groups[0]["lr"], rel=1e-12)
    assert resumed.max_lr == 2e-4 and resumed.lr_decay_steps == 20


class _Recording:
    """The engine calls a load makes, around a real PortableEngine."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        attribute = getattr(self.engine, name)
        if callable(attribute):
            def record(*args, **kwargs):
                self.calls.append(name)
                return attribute(*args, **kwargs)
            return record
        return attribute


def _load_sequence(rank, world_size, run_dir, restart, keep_schedule=None):
    """Save a trained checkpoint, then load it as an extension (weights only), as a restart, or with the
    optimizer state but the recipe's schedule (restart=True, keep_schedule=False: init_from with
    reset_optimizer: false). Returns the engine calls, whether the weights arrived, the schedule's step and
    (learning rate of each parameter group after the load, the same for an engine that loaded nothing)."""
    from megatron.core import parallel_state

    from tapa_megatron.train import checkpoint
    from tapa_megatron.train.engine import PortableEngine

    parallel_state.initialize_model_parallel()
    try:
        cfg = _cfg("optimizer.lr=1e-2", "training.steps=4")
        model = _model(cfg)
        engine = PortableEngine(model, cfg, (SEQ, MICRO, model.config.hidden_size), torch.float32)
        from tapa_megatron.train.batches import micro_batches

        for step in range(2):
            engine.train_step(micro_batches(_samples(), 0, cfg.training, 1, 0, "cpu"))
        path = checkpoint.save_checkpoint(run_dir, 2, model, engine, 8, {}, report=lambda *_: None)
        later = _cfg("optimizer.lr=1e-2", "training.steps=8")
        fresh = _model(later)
        recording = _Recording(PortableEngine(fresh, later, (SEQ, MICRO, fresh.config.hidden_size), torch.float32))
        checkpoint.load_checkpoint(path, fresh, recording, with_optimizer=restart,
                                   with_schedule=restart if keep_schedule is None else keep_schedule,
                                   report=lambda *_: None)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
                   if torch.is_tensor(a))
        untouched = PortableEngine(_model(later), later, (SEQ, MICRO, fresh.config.hidden_size), torch.float32)
        lrs = ([group["lr"] for group in recording.engine.optimizer.param_groups],
               [group["lr"] for group in untouched.optimizer.param_groups])
        return recording.calls, same, recording.engine.scheduler.num_steps, lrs
    finally:
        parallel_state.destroy_model_parallel()


def test_weights_only_load_refreshes_the_optimizer_copies(tmp_path):
    """Bug 2: an extension (reset_optimizer) reloads the optimizer's main params from the loaded weights,
    through the method Megatron's optimizers define for it; a full restart loads them with the state."""
    from megatron.core.optimizer import DistributedOptimizer, MegatronOptimizer
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

    calls, same, schedule_steps, (lrs, recipe_lrs) = run_ranks(1, _load_sequence, tmp_path / "extend", False)[0]
    assert same and "reload_model_params" in calls and "load_optimizer_state_dict" not in calls
    assert schedule_steps == 0 and lrs == recipe_lrs  # an extension starts the recipe's schedule at step 0
    calls, same, schedule_steps, _ = run_ranks(1, _load_sequence, tmp_path / "restart", True)[0]
    assert same and "reload_model_params" not in calls and "load_optimizer_state_dict" in calls
    assert schedule_steps == 2
    # Bug 6 for init_from with reset_optimizer: false: the moments arrive, the schedule is the recipe's.
    calls, same, schedule_steps, (lrs, recipe_lrs) = run_ranks(1, _load_sequence, tmp_path / "keep", True, False)[0]
    assert same and "load_optimizer_state_dict" in calls and "reload_model_params" not in calls
    assert schedule_steps == 0 and lrs == recipe_lrs
    # What MegatronEngine.reload_model_params delegates to: the mixed-precision and distributed optimizers copy model -> main params.
    for cls in (MixedPrecisionOptimizer, DistributedOptimizer):
        assert cls.reload_model_params is not MegatronOptimizer.reload_model_params
        assert "_copy_model_params_to_main_params" in inspect.getsource(cls.reload_model_params)


def test_norms_and_biases_get_no_weight_decay(megatron_single_rank):
    """Bug 8 (portable engine): Megatron's default param groups (no decay on 1-D params and biases)."""
    from tapa_megatron.train.engine import PortableEngine

    cfg = _cfg("optimizer.weight_decay=0.1")
    model = _model(cfg)
    engine = PortableEngine(model, cfg, (SEQ, MICRO, model.config.hidden_size), torch.float32)
    decay = {id(p): g["weight_decay"] for g in engine.optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 0.0 if "layernorm" in name or "final_norm" in name or name.endswith(".bias") else 0.1
        assert decay[id(param)] == expected, name
    assert any(v == 0.0 for v in decay.values()) and any(v == 0.1 for v in decay.values())


def test_selective_recompute_leaves_tapa_attention_to_its_kernels(megatron_single_rank):
    """Bug 8: TAPA's backward recomputes its scores already; Megatron must not rerun its forward as well.
    What Megatron's layers make of the config is the oracle."""
    from tapa_megatron.model import build_gpt_model, transformer_config

    for position, recompute_attention in (("tapa", False), ("rope", True)):
        cfg = _cfg(f"model.position={position}")
        config = transformer_config(cfg.model, recompute="selective")
        layer = build_gpt_model(cfg.model, config, vocab_size=VOCAB, max_sequence_length=SEQ).decoder.layers[0]
        assert layer.self_attention.checkpoint_core_attention is recompute_attention, position
        assert layer.recompute_mlp is (not recompute_attention), position


def test_tied_embeddings_with_pipeline_refused_on_cpu():
    """Bug 7: megatron-core moves the tied embedding to CUDA at build with PP > 1; refused before anything
    starts on CPU, with the fix named. (On GPU finalize_model_grads all-reduces the tied gradient, and
    the portable engine now runs finalize_model_grads too.)"""
    from tapa_megatron.train.distributed import check_layout

    with pytest.raises(ValueError, match="tie_embeddings.*pipeline > 1 needs CUDA.*tie_embeddings=false"):
        check_layout(_cfg("model.tie_embeddings=true", "parallel.pipeline=2", "training.global_batch_size=4"), 2)
    assert check_layout(_cfg("model.tie_embeddings=true"), 2) == 2


def _tied_pipeline_gradients(rank, world_size, weights):
    """PortableEngine at PP = 2 with tied embeddings, from the single-process weights: CPU pipeline
    schedule, finalize_model_grads. The gradients by their name in the single-process model."""
    from unittest import mock

    from megatron.core import dist_checkpointing, parallel_state

    from tapa_megatron.model import build_gpt_model, transformer_config
    from tapa_megatron.train import engine as engines
    from tapa_megatron.train.batches import micro_batches

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    try:
        cfg = _cfg("model.tie_embeddings=true", "parallel.pipeline=2")
        # Megatron moves the last stage's copy of the embedding to CUDA for the all-reduce that makes the
        # two copies equal at build (why check_layout refuses this layout on CPU); here it stays on the CPU,
        # and the all-reduce runs over gloo.
        with mock.patch.object(torch.Tensor, "cuda", lambda tensor, *args, **kwargs: tensor):
            model = build_gpt_model(cfg.model, transformer_config(cfg.model, pipeline_parallel=2), vocab_size=VOCAB,
                                    max_sequence_length=SEQ, pre_process=rank == 0, post_process=rank == 1)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(weights))
        missing, unexpected = model.load_state_dict(loaded, strict=False)
        assert not unexpected and all(key.endswith("_extra_state") for key in missing)
        engine = engines.PortableEngine(model, cfg, activation_shape=(SEQ, MICRO, model.config.hidden_size),
                                        dtype=torch.float32)
        engine.forward_backward(micro_batches(_samples(), 0, cfg.training, 1, 0, "cpu"))
        global_names = {"decoder.layers.0.": f"decoder.layers.{rank}.",  # one layer per stage
                        "output_layer.weight": "embedding.word_embeddings.weight"}  # the tied copy
        grads = {}
        for name, param in model.named_parameters():
            for local, global_name in global_names.items():
                name = name.replace(local, global_name)
            grads[name] = param.grad.clone()
        return grads
    finally:
        parallel_state.destroy_model_parallel()


def test_tied_embedding_gradient_is_reduced_over_the_pipeline(tmp_path):
    """Bug 7b: with tied embeddings at PP > 1 the first stage's embedding and the last stage's output
    layer are two copies of one weight; each must get the whole gradient (lookup + logits), the
    single-process model's. The portable engine first reduced only over data parallelism: each copy
    kept its own half. Megatron's finalize_model_grads all-reduces them over the embedding group."""
    reference = run_ranks(1, _reference_gradients, ["model.tie_embeddings=true"], tmp_path)[0]
    first, last = run_ranks(2, _tied_pipeline_gradients, tmp_path)
    assert first.keys() | last.keys() == reference.keys()
    assert first.keys() & last.keys() == {"embedding.word_embeddings.weight"}
    for grads in (first, last):
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-7, msg=name)


def _draws_in_the_model_parallel_rng(rank, world_size, seed):
    from megatron.core import tensor_parallel

    from tapa_megatron.train.distributed import setup_parallel, teardown_parallel

    setup_parallel(_cfg(f"training.seed={seed}"))
    try:
        with tensor_parallel.get_cuda_rng_tracker().fork():  # raises when the state was never added
            return torch.randn(8, device="cuda").cpu()
    finally:
        teardown_parallel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's RNG tracker holds CUDA generator states")
def test_setup_parallel_seeds_the_model_parallel_rng_from_the_recipe():
    """Bug 8b: setup_parallel never called model_parallel_cuda_manual_seed, so the tracker that
    tensor-parallel regions and activation recompute fork from had no state. On CPU this cannot run:
    the tracker stores torch.cuda RNG states, which a CPU-only torch cannot make (docs/gpu-path.md)."""
    first, again, other = (run_ranks(1, _draws_in_the_model_parallel_rng, seed)[0] for seed in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def _megatron_engine_with_recorded_optimizer(monkeypatch):
    """MegatronEngine.__init__ on CPU, Megatron's CUDA-only DDP and optimizer replaced by recorders (the
    wiring is what is checked here; the real classes run only in `tapa selfcheck` on a GPU)."""
    from types import SimpleNamespace

    import megatron.core.distributed as megatron_distributed
    import megatron.core.optimizer as megatron_optimizer

    from tapa_megatron.train.engine import MegatronEngine

    asked = {}

    class Optimizer:
        param_groups = [{"params": [], "lr": 0.0, "weight_decay": 0.0}]

        def scale_loss(self, loss):
            return loss

        def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, **kwargs):
            asked.update(is_loading=is_loading, **kwargs)
            return {}

    monkeypatch.setattr(megatron_distributed, "DistributedDataParallel",
                        lambda config, ddp_config, module: SimpleNamespace(no_sync=None, ddp_config=ddp_config))
    monkeypatch.setattr(megatron_optimizer, "get_megatron_optimizer", lambda config, models: Optimizer())
    config = SimpleNamespace(bf16=False, fp16=True, params_dtype=torch.float16)
    engine = MegatronEngine(SimpleNamespace(config=config), _cfg(), (SEQ, MICRO, 64), torch.float16)
    return engine, config, asked


def test_megatron_engine_sets_the_loss_scale_and_asks_for_reshardable_optimizer_state(monkeypatch):
    """Bug 8: grad_scale_func is the optimizer's loss scale (fp16 needs it; Megatron's schedule calls it),
    and the distributed optimizer's sharded state is asked for with metadata naming a current format
    (without it megatron-core falls back to the deprecated 'fully_sharded_model_space')."""
    from megatron.core.optimizer import DistributedOptimizer

    engine, config, asked = _megatron_engine_with_recorded_optimizer(monkeypatch)
    assert config.grad_scale_func == engine.optimizer.scale_loss
    assert engine.model.ddp_config.use_distributed_optimizer
    engine.optimizer_sharded_state_dict({}, is_loading=True)
    assert asked == {"is_loading": True, "metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}
    source = inspect.getsource(DistributedOptimizer.sharded_state_dict)
    assert "dp_reshardable" in source and "metadata" in source  # the format and the argument megatron-core reads
