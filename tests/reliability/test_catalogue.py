"""The bad-input catalogue: every mistake here is refused with one line that names the problem and the fix,
a non-zero exit, no new directory, and no byte changed in an existing run, its checkpoints or its data.

Each case is (name, command line, a fragment of the message, exit status). They run in this process
through `tapa`'s own entry point (cli.main); they fail in up-front validation, before any rank would start.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tapa_megatron import cli
from tapa_megatron.data.prepare import prepare
from tests.reliability.conftest import SWEEP, file_hashes, file_states, tiny_args


def train(*overrides, run="{new}", data="{data}"):
    return ["train", "tiny-cpu", *tiny_args(run, data, *overrides)]


def resume(*overrides, data="{data}"):
    """The same command as the `pretrained` run's, with changes: it would resume that run."""
    return ["train", "tiny-cpu", *tiny_args("{run}", data, *SWEEP, *overrides)]


def extend(*overrides, source="{run}", data="{data}"):
    return ["extend", "tiny-cpu-extend", "--from", source, *tiny_args("{new}", data, "training.steps=2", *overrides)]


def submit(*arguments, data="{data}", time="00:10:00"):
    return ["submit", "tiny-cpu", "--gpus-per-node", "0", "--tasks-per-node", "1", "--time", time, "--dry-run",
            *tiny_args("{new}", data), *arguments]


def prepare_data(*arguments):
    return ["data", "prepare", *arguments, "--out", "{new}"]


CATALOGUE = [
    # the recipe and its overrides
    ("unknown recipe", ["train", "no-such-recipe"], "no recipe 'no-such-recipe'", 1),
    ("unknown key", train("training.stepz=3"), "unknown key training.stepz", 1),
    ("wrong type", train("training.steps=many"), "training.steps: expected int, got 'many'", 1),
    ("unclosed YAML in an override", train("training.steps=[1,"), "override 'training.steps=[1,': the value is not "
                                                                   "valid YAML", 1),
    ("empty recipe file", ["train", "{empty_yaml}"], "data.path is not set", 1),
    ("recipe file that is a list", ["train", "{list_yaml}"], "must hold a mapping at the top level", 1),
    ("recipe file that is not YAML", ["train", "{broken_yaml}"], "is not valid YAML", 1),
    ("zero steps", train("training.steps=0"), "training.steps=0 must be a whole number >= 1", 1),
    ("negative steps", train("training.steps=-3"), "training.steps=-3 must be a whole number >= 1", 1),
    ("exit after zero steps", train("training.exit_after_steps=0"), "training.exit_after_steps=0 must be null", 1),
    ("negative save interval", train("checkpoint.save_every=-2"), "checkpoint.save_every=-2 must be 0 or", 1),
    ("log every 0 steps", train("training.log_every=0"), "training.log_every=0 must be a whole number >= 1", 1),
    ("empty global batch", train("training.global_batch_size=0"), "training.global_batch_size=0 must be", 1),
    ("empty micro-batch", train("training.micro_batch_size=0"), "is not a multiple of training.micro_batch_size=0", 1),
    ("batch not a multiple", train("training.global_batch_size=7"), "global_batch_size=7 is not a multiple", 1),
    ("lr NaN", train("optimizer.lr=.nan"), "optimizer.lr=nan must be a finite number >= 0", 1),
    ("lr infinite", train("optimizer.lr=.inf"), "optimizer.lr=inf must be a finite number >= 0", 1),
    ("lr negative", train("optimizer.lr=-1e-3"), "optimizer.lr=-0.001 must be a finite number >= 0", 1),
    ("warm-up as long as the run", train("training.steps=4", "optimizer.warmup_steps=4"),
     "optimizer.warmup_steps=4 must be below training.steps=4", 1),
    ("beta of 1.5", train("optimizer.betas=[0.9, 1.5]"), "optimizer.betas=[0.9, 1.5] must be two numbers in [0, 1)", 1),
    ("eps of 0", train("optimizer.eps=0"), "optimizer.eps=0.0 must be a finite number > 0", 1),
    ("negative clipping", train("optimizer.clip_grad=-1"), "optimizer.clip_grad=-1.0 must be 0 (no clipping)", 1),
    ("min lr above lr", train("optimizer.min_lr_ratio=2"), "optimizer.min_lr_ratio=2.0 must be a fraction", 1),
    ("sequence of 0 tokens", train("data.seq_length=0"), "data.seq_length=0 must be a whole number >= 1", 1),
    ("negative keep", train("checkpoint.keep=-1"), "checkpoint.keep=-1 must be 0 or", 1),
    ("TAPA alpha 0", train("model.tapa.alpha=0"), "model.tapa.alpha=0.0 must be > 0", 1),
    ("TAPA theta 1.5", train("model.tapa.theta=1.5"), "theta=1.5 must lie strictly between 0 and 1", 1),
    ("init std NaN", train("model.init_std=.nan"), "model.init_std=nan must be a finite number > 0", 1),
    ("unknown precision", train("training.precision=fp16"), "training.precision='fp16' is unknown", 1),
    ("unknown position", train("model.position=alibi"), "model.position='alibi' is unknown", 1),
    ("unknown decay", train("optimizer.decay_style=step"), "optimizer.decay_style='step' is unknown", 1),
    ("unknown resume mode", train("checkpoint.resume=maybe"), "checkpoint.resume='maybe' is unknown", 1),
    ("unknown mismatch to allow", train("checkpoint.allow_mismatch=[everything]"),
     "checkpoint.allow_mismatch=['everything'] must be a list of tokenizer and position", 1),
    ("negative skip budget", train("training.skip_nonfinite_steps=-1"), "training.skip_nonfinite_steps=-1 must be", 1),
    ("unknown option", train("--frobnicate"), "unrecognized arguments: --frobnicate", 2),
    # the layout
    ("world does not factor", [*train("parallel.tensor=2"), "--nproc", "3"], "world size 3 does not factor", 1),
    ("key-value groups per tensor rank", [*train("parallel.tensor=4"), "--nproc", "4"],
     "model.num_query_groups=2 is not divisible by parallel.tensor=4", 1),
    ("layers per pipeline stage", [*train("parallel.pipeline=3"), "--nproc", "3"],
     "model.num_layers=2 is not divisible by parallel.pipeline=3", 1),
    ("recompute on CPU", train("training.recompute=full"), "training.recompute needs CUDA", 1),
    ("sequence parallel on CPU", train("parallel.sequence_parallel=true"), "needs Transformer Engine", 1),
    # the data
    ("data directory missing", train(data="{nowhere}"), "data.path={nowhere} does not exist", 1),
    ("data.path not set", train(data=""), "data.path is not set", 1),
    ("data.path is a file", train(data="{data}/tokenizer.json"), "tokenizer.json is not a directory", 1),
    ("no tokenizer", train(data="{no_tokenizer}"), "has no tokenizer.json", 1),
    ("tokenizer that does not parse", train(data="{broken_tokenizer}"), "its tokenizer.json does not load", 1),
    ("no indexed dataset", train(data="{no_dataset}"), "No indexed dataset at", 1),
    ("dataset of another tokenizer", train(data="{mixed}"), "was tokenized with vocab size 1024", 1),
    ("split without a train share", train("data.split=0,1,0"), "gives no train share", 1),
    ("vocabulary below the tokenizer's", train("model.vocab_size=512"), "model.vocab_size=512 is smaller than the "
                                                                        "1024 tokens", 1),
    # what the run starts from
    ("init_from missing", train("checkpoint.init_from={nowhere}"), "checkpoint.init_from={nowhere}: No complete "
                                                                   "checkpoint at", 1),
    ("init_from of another shape", train("checkpoint.init_from={run}", "model.num_layers=4"),
     "the model does not match (num_layers: 2 in", 1),
    ("resume with another tokenizer of the same size", resume(data="{other_tokenizer}"),
     "pass checkpoint.allow_mismatch=[tokenizer] to accept it deliberately", 1),
    ("resume a vocab-1024 run on vocab-512 data", resume(data="{vocab_512}"),
     "its embedding has 1024 rows (saved at tensor parallel 1), this run builds 512", 1),
    ("resume with another model (--force)", [*resume("model.num_layers=4"), "--force"],
     "cannot resume from {run}/checkpoints/step_00000004: the model does not match (num_layers: 2 in", 1),
    ("resume with other TAPA settings (--force)", [*resume("model.tapa.alpha=60"), "--force"],
     "pass checkpoint.allow_mismatch=[position] to accept it deliberately", 1),
    ("resume as RoPE (--force)", [*resume("model.position=rope"), "--force"],
     "position tapa {{'alpha': 0.1, 'theta': 0.5, 'phase': 'quadratic', 'phase_scale': 6.283185307179586}} in", 1),
    ("resume a run of another recipe", ["train", "tiny-cpu-extend", *tiny_args("{run}", "{data}")],
     "holds a run of recipe 'tiny-cpu'", 1),
    ("extend from nowhere", extend(source="{nowhere}"), "No complete checkpoint at {nowhere}", 1),
    ("extend from a directory without checkpoints", extend(source="{data}"), "No complete checkpoint at {data}", 1),
    ("extend into another shape", extend("model.num_layers=4"), "cannot start from", 1),
    ("extend with another tokenizer", extend(data="{other_tokenizer}"), "allow_mismatch=[tokenizer]", 1),
    ("extend onto a smaller vocabulary", extend(data="{vocab_512}"), "its embedding has 1024 rows", 1),
    ("extend as RoPE", extend("model.position=rope"), "allow_mismatch=[position]", 1),
    # tapa submit (dry runs: they fail before any Slurm is asked)
    ("submit without data", submit(data="{nowhere}"), "data.path={nowhere} does not exist", 1),
    ("submit without a tokenizer", submit(data="{no_tokenizer}"), "has no tokenizer.json", 1),
    ("submit 99 minutes", submit(time="00:99:00"), "--time '00:99:00': minutes and seconds run from 00 to 59", 1),
    ("submit a time it cannot read", submit(time="90min"), "--time '90min' is not [D-]HH:MM:SS", 1),
    ("submit a layout the nodes cannot hold", [*submit("parallel.tensor=2"), "--tasks-per-node", "3"],
     "world size 3 does not factor into tensor (2)", 1),
    ("submit steps=0", submit("training.steps=0"), "training.steps=0 must be a whole number >= 1", 1),
    ("submit a chain whose stages do not fit",
     ["submit", "--chain", "tiny-cpu", "{deeper_extend}", "--run-dir", "{new}", "--gpus-per-node", "0",
      "--tasks-per-node", "1", "--time", "00:10:00", "--dry-run", "data.path={data}", "data.split=1,1,0"],
     "cannot start from stage 'tiny-cpu'", 1),
    # tapa data prepare
    ("a file of NUL bytes", prepare_data("--input", "{nul_file}"), "looks binary, not text", 1),
    ("a UTF-16 file", prepare_data("--input", "{utf16_file}"), "(a UTF-16 file? an archive?)", 1),
    ("an input that is not there", prepare_data("--input", "{nowhere}.txt"), "does not exist or is not a file", 1),
    ("a PDF", prepare_data("--input", "{pdf_file}"), "unsupported type '.pdf'", 1),
    ("a vocabulary of 100", prepare_data("--input", "{text_file}", "--vocab-size", "100"), "leaves no room for merges",
     1),
]


@pytest.fixture(scope="module")
def inputs(novels_data, pretrained, tmp_path_factory):
    """Paths the catalogue's command lines refer to: good data, data of other tokenizers, broken copies."""
    root = tmp_path_factory.mktemp("catalogue-inputs")
    book = next(novels_data.parent.glob("Northanger*.txt"))
    text = book.read_text(encoding="utf-8")
    excerpts = [root / "first.txt", root / "second.txt"]  # two documents: one trains, one validates
    for index, excerpt in enumerate(excerpts):
        excerpt.write_text(text[index * 150_000:(index + 1) * 150_000], encoding="utf-8")
    other = root / "other-tokenizer"  # another tokenizer with the same 1024 tokens
    prepare(other, inputs=excerpts, test_books=[], vocab_size=1024)
    small = root / "vocab-512"
    prepare(small, inputs=excerpts, test_books=[], vocab_size=512)
    dataset = [novels_data / name for name in ("train_text_document.bin", "train_text_document.idx", "manifest.json")]
    broken = {"no_tokenizer": dataset, "broken_tokenizer": dataset, "no_dataset": [novels_data / "tokenizer.json"],
              "mixed": [*dataset, small / "tokenizer.json"]}
    for name, files in broken.items():
        (root / name).mkdir()
        for file in files:
            shutil.copy(file, root / name / file.name)
    (root / "broken_tokenizer" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("training: {steps: [1,\n")
    deeper = yaml.safe_load((cli.RECIPES_DIR / "tiny-cpu-extend.yaml").read_text())
    deeper.update(name="deeper-extend", model={**deeper["model"], "num_layers": 4})
    (root / "deeper-extend.yaml").write_text(yaml.safe_dump(deeper))
    (root / "nul.txt").write_bytes(b"\0" * 300_000)
    (root / "utf16.txt").write_bytes(("It is a truth universally acknowledged.\n" * 5000).encode("utf-16-le"))
    (root / "paper.pdf").write_bytes(b"%PDF-1.4\n")
    paths = {"data": novels_data, "run": pretrained, "nowhere": root / "nowhere", "other_tokenizer": other,
             "vocab_512": small, "empty_yaml": root / "empty.yaml", "list_yaml": root / "list.yaml",
             "broken_yaml": root / "broken.yaml", "deeper_extend": root / "deeper-extend.yaml",
             "nul_file": root / "nul.txt", "utf16_file": root / "utf16.txt", "pdf_file": root / "paper.pdf",
             "text_file": excerpts[0], **{name: root / name for name in broken}}
    kept = [novels_data, pretrained, other, small]
    return paths, kept, file_hashes(*kept)


@pytest.mark.parametrize("name,argv,fragment,status", CATALOGUE, ids=[case[0] for case in CATALOGUE])
def test_bad_input_is_one_line_nonzero_and_changes_nothing(name, argv, fragment, status, inputs, tmp_path,
                                                           monkeypatch, capsys):
    paths, kept, _ = inputs
    new = tmp_path / "new"
    values = {key: str(value) for key, value in {**paths, "new": new}.items()}
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = file_states(*kept)
    with pytest.raises(SystemExit) as refused:
        cli.main([item.format(**values) for item in argv])
    code = refused.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert (1 if isinstance(code, str) else code) == status
    assert fragment.format(**values) in message
    assert "\n" not in message and "Traceback" not in message
    assert not new.exists() and list(work.iterdir()) == []
    assert file_states(*kept) == before


def test_the_catalogue_is_large_and_left_every_byte_as_it_was(inputs):
    """Runs after the catalogue (pytest keeps file order): the contents, not only the sizes and times."""
    assert len(CATALOGUE) >= 40
    _, kept, hashes = inputs
    assert file_hashes(*kept) == hashes


def test_on_a_multi_rank_launch_only_rank_0_prints(inputs, tmp_path, monkeypatch):
    paths, _, _ = inputs
    argv = train("training.steps=0", run=str(tmp_path / "new"), data=str(paths["data"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    for rank, expected in (("0", "tapa: training.steps=0 must be"), ("1", None)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as refused:
            cli.main(argv)
        if expected is None:
            assert refused.value.code == 1  # exits non-zero without a word
        else:
            assert str(refused.value.code).startswith(expected)


def test_dry_run_works_where_slurm_is_installed_but_not_configured(inputs, tmp_path, monkeypatch, capsys):
    paths, _, _ = inputs
    unconfigured = tmp_path.parent / f"{tmp_path.name}-slurm.conf"
    unconfigured.write_text("")  # an empty slurm.conf fails at once (a missing one is retried for 60 s)
    monkeypatch.setenv("SLURM_CONF", str(unconfigured))
    monkeypatch.chdir(tmp_path)
    cli.main(["submit", "tiny-cpu", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:10:00",
              "--partition", "gpu", "--dry-run", f"data.path={paths['data']}", "data.split=1,1,0"])
    printed = capsys.readouterr()
    assert "#SBATCH --partition=gpu" in printed.out and "scontrol requeue" in printed.out
    if shutil.which("sbatch"):
        assert "# not checked with Slurm, which did not answer" in printed.err
    assert list(tmp_path.iterdir()) == []


def _manifest_vocab(path):
    return json.loads((Path(path) / "manifest.json").read_text())["tokenizer"]["vocab_size"]


def test_the_other_tokenizer_really_has_the_same_size(inputs):
    paths, _, _ = inputs
    assert _manifest_vocab(paths["other_tokenizer"]) == _manifest_vocab(paths["data"]) == 1024
    assert _manifest_vocab(paths["vocab_512"]) == 512
