"""`tapa train` / `tapa extend` as a user runs them: a subprocess, a recipe, overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from tapa_megatron.config import load_config
from tapa_megatron.train import RunConfig

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def tapa(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tapa_megatron.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_train_then_extend_from_the_command_line(novels_data, tmp_path):
    common = [f"data.path={novels_data}", "data.split=1,1,0", "training.tensorboard=true"]
    trained = tapa("train", "tiny-cpu", f"run_dir={tmp_path / 'pre'}", "training.steps=4", "optimizer.warmup_steps=1",
                   "training.log_every=2", *common)
    assert trained.returncode == 0, trained.stderr
    assert "step 4/4" in trained.stdout and "tok/s" in trained.stdout and "ETA" in trained.stdout
    assert (tmp_path / "pre" / "config.yaml").is_file()
    assert any((tmp_path / "pre" / "tensorboard").iterdir())
    saved = load_config(RunConfig, tmp_path / "pre" / "config.yaml")
    assert saved.training.steps == 4 and saved.model.tapa.alpha == 0.1

    extended = tapa("extend", "tiny-cpu-extend", "--from", str(tmp_path / "pre"), f"run_dir={tmp_path / 'ext'}",
                    "training.steps=2", "optimizer.warmup_steps=0", "--nproc", "2", "parallel.tensor=2", *common)
    assert extended.returncode == 0, extended.stderr
    assert "[extend] starting from" in extended.stdout and "seq 512" in extended.stdout
    assert (tmp_path / "ext" / "checkpoints" / "step_00000002" / "tapa_complete.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["train", "no-such-recipe"], "no recipe 'no-such-recipe'"),
    (["train", "tiny-cpu", "model.tapa.phase=cubic"], "model.tapa.phase='cubic' is unknown"),
    (["train", "tiny-cpu", "training.stepz=3"], "unknown key training.stepz"),
    (["train", "tiny-cpu", "--nproc", "3", "parallel.tensor=2"], "world size 3 does not factor"),
    (["train", "tiny-cpu", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "tiny-cpu", "training.recompute=full"], "training.recompute needs CUDA"),
    (["train", "tiny-cpu", "parallel.sequence_parallel=true"], "sequence_parallel needs Transformer Engine"),
])
def test_bad_command_lines_fail_with_a_clear_message(args, message):
    result = tapa(*args)
    assert result.returncode != 0
    assert message in result.stderr


def test_every_recipe_parses_and_fits_the_machines_it_names():
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    assert len(paths) >= 14
    for path in paths:
        cfg = load_config(RunConfig, path)  # validates every key and type, without building the model
        assert cfg.sized_for and cfg.description, path
        if "H100" in cfg.sized_for:  # "512x H100 80GB ...": the layout must factor over that many GPUs
            gpus = int(cfg.sized_for.split("x")[0])
            assert cfg.data_parallel_size(gpus) >= 1, path
            assert cfg.data.seq_length % (2 * cfg.parallel.context) == 0, path


def test_paper_settings_in_the_8b_recipes():
    pretrain = load_config(RunConfig, RECIPES_DIR / "llama3-8b-8k-pretrain.yaml")
    assert (pretrain.optimizer.lr, pretrain.optimizer.betas, pretrain.optimizer.eps) == (2e-5, [0.9, 0.95], 1e-8)
    assert (pretrain.optimizer.weight_decay, pretrain.optimizer.min_lr_ratio, pretrain.optimizer.warmup_steps) == \
        (0.0, 0.1, 5000)
    assert (pretrain.model.tapa.alpha, pretrain.model.tapa.theta, pretrain.training.global_batch_size) == (0.1, 0.5, 256)
    extend = load_config(RunConfig, RECIPES_DIR / "llama3-8b-32k-extend.yaml")
    assert (extend.training.steps, extend.optimizer.warmup_steps, extend.data.seq_length) == (500, 50, 32768)
    assert extend.model.tapa == pretrain.model.tapa  # TAPA changes nothing when extending
    assert load_config(RunConfig, RECIPES_DIR / "llama3-8b-8k-pretrain-rope.yaml").optimizer.lr == 1e-4
    pi = load_config(RunConfig, RECIPES_DIR / "llama3-8b-32k-extend-pi.yaml").model.rope
    yarn = load_config(RunConfig, RECIPES_DIR / "llama3-8b-32k-extend-yarn.yaml").model.rope
    assert (pi.scaling, pi.factor * pi.original_max_position) == ("pi", 65536)  # PI to 64K
    assert (yarn.scaling, yarn.factor, yarn.base) == ("yarn", 8.0, 500000.0)
    assert load_config(RunConfig, RECIPES_DIR / "llama3-8b-128k-extend.yaml").parallel.context > 1


TWINS = {  # suffix: (position, rope base, rope scaling) of a TAPA extension recipe's baseline twins
    "rope": ("rope", 5e5, "none"), "rope-b2e8": ("rope", 2e8, "none"), "pi": ("rope", 5e5, "pi"),
    "yarn": ("rope", 5e5, "yarn"), "nope": ("none", None, None),
}


def test_every_extension_recipe_has_baseline_twins_with_its_layout_and_batch():
    from tapa_megatron.plan.search import plan

    extensions = [path for path in sorted(RECIPES_DIR.glob("llama3-*-extend.yaml"))]
    assert len(extensions) >= 3
    for path in extensions:
        tapa_run = load_config(RunConfig, path)
        assert tapa_run.model.position == "tapa", path
        for suffix, (position, base, scaling) in TWINS.items():
            twin = load_config(RunConfig, RECIPES_DIR / f"{path.stem}-{suffix}.yaml")
            assert (twin.parallel, twin.training, twin.data, twin.optimizer, twin.sized_for) == \
                (tapa_run.parallel, tapa_run.training, tapa_run.data, tapa_run.optimizer, tapa_run.sized_for), twin.name
            assert twin.model.position == position and twin.model.preset == tapa_run.model.preset, twin.name
            if position == "rope":
                assert (twin.model.rope.base, twin.model.rope.scaling) == (base, scaling), twin.name
            # the layout is one `tapa plan` finds fitting on the GPUs the recipe names
            p, t = twin.parallel, twin.training
            gpus = int(twin.sized_for.split("x")[0])
            fitting = plan(twin.model, twin.data.seq_length, gpus, micro_batch=t.micro_batch_size,
                           recompute=t.recompute == "full", cp_comm=p.context_comm)
            layouts = [(c.layout.tp, c.layout.cp, c.layout.pp) for c in fitting]
            assert (p.tensor, p.context, p.pipeline) in layouts, twin.name
