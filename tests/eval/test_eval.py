"""Evaluation pieces against hand computations and direct forward passes; the demo end to end."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tapa_megatron.demo import results_table
from tapa_megatron.eval import distance_bias, passkey, perplexity
from tapa_megatron.eval.model import EvalModel
from tapa_megatron.model import ModelConfig, build_gpt_model, transformer_config
from tapa_megatron.ops import amplitude_dim
from tapa_megatron.ops.reference import tapa_scores


def context_sized_losses(window):
    """A stand-in model whose loss for a token is 1 / (tokens of context it had in its window)."""
    return torch.tensor([1.0 / c for c in range(1, len(window))], dtype=torch.float64)


def test_sliding_window_scores_every_token_once_with_the_protocols_context():
    total, count = perplexity.sliding_window_nll(context_sized_losses, list(range(10)), context=4, stride=2)
    # first window scores tokens 1..3 (contexts 1, 2, 3); each later window its last two tokens (contexts 2, 3)
    assert count == 9
    assert total == pytest.approx(1 + 1 / 2 + 1 / 3 + 3 * (1 / 2 + 1 / 3))
    with pytest.raises(ValueError, match="stride=5 must be in 1..context=4"):
        perplexity.sliding_window_nll(context_sized_losses, list(range(10)), context=4, stride=5)


@pytest.fixture(scope="module")
def tiny_model(megatron_single_rank):
    cfg = ModelConfig(preset="tiny")
    torch.manual_seed(0)
    model = build_gpt_model(cfg, transformer_config(cfg), vocab_size=128, max_sequence_length=64).eval()
    return EvalModel(model=model, config=cfg, tokenizer=None, train_length=16, name="tiny")


def test_sliding_window_perplexity_equals_direct_forward_passes(tiny_model):
    tokens = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    context = 12
    direct = [tiny_model.token_losses(tokens[max(0, t - context + 1): t + 1])[-1].item() for t in range(1, 40)]
    expected = math.exp(sum(direct) / len(direct))
    assert perplexity.perplexity(tiny_model.token_losses, [tokens], context, stride=1) == pytest.approx(expected)
    # a document shorter than the window: one forward pass over it
    whole = math.exp(tiny_model.token_losses(tokens[:10]).mean().item())
    assert perplexity.perplexity(tiny_model.token_losses, [tokens[:10]], 64, stride=16) == pytest.approx(whole)


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_passkey_prompt_and_scorer():
    tokenizer = CharTokenizer()
    rng = random.Random(0)
    tokens, answer_start, key = passkey.passkey_prompt(tokenizer, 600, 0.25, rng)
    text = tokenizer.decode(tokens)
    assert len(tokens) == 600 and text.endswith(passkey.QUESTION + key)
    needle_at = text.index(passkey.NEEDLE.format(key=key))
    assert abs(needle_at / (600 - len(passkey.NEEDLE.format(key=key)) - len(passkey.QUESTION) - 5) - 0.25) < 0.01
    assert tokenizer.decode(tokens[answer_start:]) == key

    def oracle(prefix):  # one-hot logits on the true next token
        logits = torch.zeros(len(prefix), 256)
        logits[torch.arange(len(prefix)), torch.tensor(tokens[1:len(prefix) + 1])] = 1.0
        return logits

    assert passkey.retrieved(oracle, tokens, answer_start)
    wrong = tokens[:-1] + [ord("0") if tokens[-1] != ord("0") else ord("1")]
    assert not passkey.retrieved(oracle, wrong, answer_start)
    with pytest.raises(ValueError, match="cannot hold the needle"):
        passkey.passkey_prompt(tokenizer, 50, 0.5, rng)


def test_distance_bias_of_known_scores():
    """score = -0.5 * distance: delta = 0.5 * (long - short) distance, mean known in closed form."""
    def score_fn(layer, head, q, k):
        return -0.5 * (q - k).double()

    deltas = distance_bias.sample_deltas(score_fn, seq_len=400, num_layers=2, num_heads=3, short_range=(0, 10),
                                         long_range=(200, 210), pairs=20000)
    assert distance_bias.statistics(deltas)["mean"] == pytest.approx(0.5 * (205 - 5), rel=0.01)
    assert deltas.min() >= 0.5 * (200 - 10) and deltas.max() <= 0.5 * 210
    with pytest.raises(ValueError, match="needs sequences longer"):
        distance_bias.sample_deltas(score_fn, 100, 1, 1, (0, 10), (200, 210), 10)


def test_pair_scores_are_the_score_matrix_entries(tiny_model):
    attn = tiny_model.core_attentions()[0]
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, 32, generator=gen, dtype=torch.float64), torch.randn(5, 32, generator=gen, dtype=torch.float64)
    q_pos, k_pos = torch.tensor([900, 17, 40, 3, 1000]), torch.tensor([0, 16, 40, 2, 10])
    matrix = tapa_scores(q[None, None], k[None, None], q_pos[None], k_pos[None], alpha=0.1,
                         amp_dim=amplitude_dim(32, 0.5), phase="quadratic")[0, 0]
    torch.testing.assert_close(attn.pair_scores(q, k, q_pos, k_pos), matrix.diagonal())


def test_model_deltas_run_on_a_real_model(tiny_model):
    tokens = torch.randint(0, 128, (130,), generator=torch.Generator().manual_seed(3)).tolist()
    deltas = distance_bias.model_deltas(tiny_model, tokens, (0, 4), (100, 104), pairs=200)
    assert deltas.shape == (200,) and np.isfinite(deltas).all() and deltas.std() > 0


def test_demo_quick_writes_results(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("the demo's corpus comes from Debian packages via `apt-get download`; apt-get is not on PATH")
    # the README's main command, shortened: a fresh process, as a user runs it
    run = subprocess.run([sys.executable, "-m", "tapa_megatron.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| TAPA |" in run.stdout and "| RoPE |" in run.stdout and "| NoPE |" in run.stdout
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    length = results["train_length"]
    assert results["extend_length"] == 4 * length
    assert results["lengths"] == [length * m for m in (1, 2, 4, 8, 16)]
    for name in ("tapa", "rope", "none"):
        entry = results["models"][name]
        for ppl in (entry["ppl"], entry["ppl_zero_shot"]):
            assert len(ppl) == 5 and all(math.isfinite(p) and 1 < p < 1000 for p in ppl)
        assert len(entry["passkey"]) == 5 and all(0 <= a <= 1 for a in entry["passkey"])
    for png in ("perplexity.png", "passkey.png", "distance_bias.png", "zero-shot/perplexity.png"):
        assert (tmp_path / "demo" / "eval" / png).stat().st_size > 10_000
    assert results_table(results) in run.stdout  # the README's table is this function of results.json


def test_results_table_renders_a_hand_made_results_file():
    results = {"train_length": 64, "extend_length": 256, "lengths": [64, 128, 256, 512, 1024],
               "models": {"tapa": {"ppl": [10, 10, 10, 11, 11], "ppl_zero_shot": [10, 12, 14, 16, 20],
                                   "passkey": [1, 1, 0.5, 0.25, 0]},
                          "none": {"ppl": [20, 20, 20, 40, 80], "ppl_zero_shot": [20, 30, 40, 50, 60],
                                   "passkey": [0, 0, 0, 0, 0]}}}
    table = results_table(results).splitlines()
    assert table[2] == "| model | 1L = 64 | 2L | 4L | 8L | 16L | 16L / 4L | 16L / L |"
    assert table[4] == "| TAPA | 10.00 | 10.00 | 10.00 | 11.00 | 11.00 | 1.10 | 1.10 |"
    assert table[5] == "| NoPE | 20.00 | 20.00 | 20.00 | 40.00 | 80.00 | 4.00 | 4.00 |"
    assert table[11] == "| TAPA | 10.00 | 12.00 | 14.00 | 16.00 | 20.00 | 1.43 | 2.00 |"
    assert table[-2:] == ["| TAPA | 1.00 | 1.00 | 0.50 | 0.25 | 0.00 |", "| NoPE | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |"]


def test_passkey_plot_spans_zero_to_one_whatever_the_accuracies():
    import matplotlib.pyplot as plt

    from tapa_megatron.eval import passkey_plot

    for accuracies in ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.25, 0.5, 0.25]):
        fig = passkey_plot({"tapa": accuracies}, [64, 128, 256], mark_x=[(64, "L")])
        assert fig.axes[0].get_ylim() == (-0.05, 1.05)  # matplotlib alone zooms all-zero to -0.055..0.055
        plt.close(fig)


def _train(rank, world_size, run_dir, data, seq_length, steps, init_from=None):
    from tapa_megatron.config import load_config
    from tapa_megatron.train import RunConfig, train

    cfg = load_config(RunConfig, None, [
        f"run_dir={run_dir}", f"data.path={data}", f"data.seq_length={seq_length}", "data.split=1,1,0",
        f"training.steps={steps}", "training.global_batch_size=2", "training.micro_batch_size=1",
        "training.tensorboard=false", "optimizer.warmup_steps=0", "model.num_layers=2",
        *([f"checkpoint.init_from={init_from}"] if init_from else [])])
    return str(train(cfg).final_checkpoint)


@pytest.fixture(scope="module")
def pretrained_and_extended(novels_data, tmp_path_factory):
    """A run at 32 tokens (step 0) and its extension to 64 tokens (1 step): the checkpoints `tapa eval` reads."""
    from tests.distributed import run_ranks

    root = tmp_path_factory.mktemp("runs")
    pretrained = run_ranks(1, _train, root / "pre", novels_data, 32, 0)[0]
    extended = run_ranks(1, _train, root / "ext", novels_data, 64, 1, pretrained)[0]
    return pretrained, extended


def test_tapa_eval_reports_progress_and_records_checkpoints_and_extension(pretrained_and_extended, tmp_path):
    pretrained, extended = pretrained_and_extended
    out = tmp_path / "eval"
    # a fresh process with stdout piped, as under Slurm or `| tee`: progress must arrive while it runs
    command = [sys.executable, "-m", "tapa_megatron.cli", "eval", extended, pretrained, "--names", "ext", "pre",
               "--out", str(out), "--multiples", "1", "2", "--max-tokens", "200", "--passkey-trials", "1",
               "--bias-pairs", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # Python's default: a pipe is buffered
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines, finished_at_first_progress = [], None
    for line in process.stdout:
        if "/8)" in line and finished_at_first_progress is None:  # results.json is written last
            finished_at_first_progress = (out / "results.json").exists()
        lines.append(line.rstrip())
    stderr = process.stderr.read()
    assert process.wait(timeout=600) == 0, stderr[-3000:]
    assert finished_at_first_progress is False, lines  # flushed while running, not all at once on exit
    progress = [line for line in lines if line.endswith("/8)")]
    # 2 models x 2 lengths x (perplexity, passkey), counted in order
    assert [line.rsplit("(", 1)[1] for line in progress] == [f"{i}/8)" for i in range(1, 9)]
    assert "ext" in progress[0] and "@     64 tokens" in progress[0] and "pre" in progress[-1]

    results = json.loads((out / "results.json").read_text())
    assert results["train_length"] == 64 and results["extend_length"] == 64  # the extension run's length
    assert results["models"]["ext"]["checkpoint"] == extended and results["models"]["ext"]["step"] == 1
    assert results["models"]["pre"]["checkpoint"] == pretrained and results["models"]["pre"]["step"] == 0
