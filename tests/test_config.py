"""Typed YAML configs: nesting, dotted overrides, errors that name the key."""

from dataclasses import dataclass, field

import pytest

from tapa_megatron.config import ConfigError, dump_yaml, load_config
from tapa_megatron.model import ModelConfig


@dataclass
class Optim:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    resume: str | None = None
    optim: Optim = field(default_factory=Optim)
    model: ModelConfig = field(default_factory=ModelConfig)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: demo\noptim:\n  lr: 3e-4\nmodel:\n  position: rope\n  rope: {base: 10000}\n")
    cfg = load_config(Run, path, ["steps=20", "optim.betas=[0.8, 0.9]", "model.tapa.alpha=0.2", "resume=auto"])
    assert (cfg.name, cfg.steps, cfg.resume) == ("demo", 20, "auto")
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.position == "rope" and cfg.model.rope.base == 10000.0 and cfg.model.tapa.alpha == 0.2
    assert cfg.model.num_layers == 2  # filled from the tiny preset


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Run, None, ["model.preset=1b", "optim.lr=2e-5"])
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown key optim.lrr"),
    (["model.tapa.alhpa=0.1"], "unknown key model.tapa.alhpa"),
    (["steps=ten"], "steps: expected int, got 'ten'"),
    (["steps=1.5"], "steps: expected int"),
    (["optim.lr=fast"], "optim.lr: expected float"),
    (["optim=3"], "optim: expected a mapping"),
    (["optim.betas=0.9"], "optim.betas: expected a list"),
    (["model.tapa.phase=cubic"], "model.tapa.phase='cubic' is unknown"),
    (["model.preset=7b"], "model.preset='7b' is unknown"),
    (["steps"], "not of the form key.path=value"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(Run, None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Run, bad)
