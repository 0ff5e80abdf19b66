"""The `tapa` command. Each subcommand parses its arguments, then calls one function of the package.

    tapa data prepare --corpus gutenberg --out data/gutenberg
    tapa train tiny-cpu training.steps=50
    tapa extend tiny-cpu-extend --from runs/tiny-cpu
    tapa status runs/tiny-cpu
    tapa bench attention
"""

import argparse
import os
import sys
import warnings
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# megatron-core without Transformer Engine / Apex (any CPU machine) warns on every import.
for message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated",
                "When using async grad allreduce", "Please use DTensor instead", "`load_state_dict` is deprecated"):
    warnings.filterwarnings("ignore", message=message)


def resolve_recipe(name):
    """A recipe path, or a name from recipes/ (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml", Path("recipes") / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    _fail(f"no recipe {name!r}: not a file, and not one of recipes/: {', '.join(known)}")


def _launch_rank(env=os.environ):
    """This process's rank in a torchrun / srun / MPI launch (0 when alone), read from its environment."""
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    return next((int(env[name]) for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
                 if name in env), 0)


def _fail(message):
    """Exit non-zero with a one-line error: rank 0 prints it, the other ranks of a launch exit quietly."""
    if _launch_rank() != 0:
        raise SystemExit(1)
    raise SystemExit(f"tapa: {message}")


def _load_run_config(recipe, overrides):
    from tapa_megatron.config import ConfigError, load_config
    from tapa_megatron.train import RunConfig

    try:
        return load_config(RunConfig, resolve_recipe(recipe), overrides)
    except ConfigError as err:
        _fail(err)


def _run_training(cfg, nproc, force=False):
    """Check everything that can be checked (train/validate.py), then train in this process (alone, or as one
    rank of torchrun / srun / mpirun) or on nproc local CPU ranks (launch/local.py). USR1, SIGTERM or SIGINT
    stops the run after a checkpoint, with PREEMPTED_EXIT_STATUS."""
    from tapa_megatron.launch import local, rundir
    from tapa_megatron.launch.signals import PREEMPTED_EXIT_STATUS, StopRequest
    from tapa_megatron.train import train
    from tapa_megatron.train.distributed import detect_launch
    from tapa_megatron.train.errors import RunError
    from tapa_megatron.train.validate import validate_run

    try:
        launch = detect_launch()
        in_process = nproc <= 1 or launch.launcher != "single"
        validate_run(cfg, launch.world_size if in_process else nproc)
    except (ValueError, RuntimeError) as err:  # RunError, and detect_launch's
        _fail(err)
    conflict = rundir.recipe_conflict(cfg)
    if conflict and not force:
        _fail(f"{conflict}. Choose another run_dir, or pass --force to train there anyway "
              "(the old config.yaml is kept beside; the newest checkpoint there is resumed).")
    if conflict and launch.rank == 0:
        print(f"[run dir] --force: kept the previous run's config as {rundir.set_aside_config(cfg.run_dir)}")
    if not in_process:
        sys.exit(local.run(cfg, nproc))
    if launch.rank == 0:
        print(f"[launch] {launch}", flush=True)
    with StopRequest() as stop:
        try:
            result = train(cfg, stop_requested=stop)
        except RunError as err:
            _fail(err)
        except KeyboardInterrupt:
            _fail("interrupted twice: stopped without a checkpoint (the complete ones are kept)")
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_STATUS)


def cmd_train(args):
    _run_training(_load_run_config(args.recipe, args.overrides), args.nproc, args.force)


def cmd_extend(args):
    overrides = [*args.overrides, f"checkpoint.init_from={args.source}"]
    _run_training(_load_run_config(args.recipe, overrides), args.nproc, args.force)


def cmd_submit(args):
    from tapa_megatron.launch import slurm, submit

    # argparse may file overrides under RECIPE or --chain; a key=value is an override wherever it stands
    given = [*([args.recipe] if args.recipe else []), *args.overrides, *(args.chain or [])]
    overrides = [item for item in given if "=" in item]
    recipes = [item for item in given if "=" not in item]
    if not recipes:
        raise SystemExit("tapa submit: give a RECIPE, or --chain RECIPE RECIPE ...")
    if len(recipes) > 1 and not args.chain:
        raise SystemExit(f"tapa submit: several recipes ({', '.join(recipes)}): submit stages with --chain.")
    job = submit.JobRequest(nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                            tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                            partition=args.partition, account=args.account,
                            signal_lead=args.signal_lead, launcher=args.launcher, qos=args.qos,
                            constraint=args.constraint, reservation=args.reservation, exclusive=args.exclusive,
                            sbatch_args=tuple(args.sbatch_arg))
    try:
        submit.run([resolve_recipe(name) for name in recipes], overrides, job, run_dir=args.run_dir,
                   force=args.force, dry_run=args.dry_run)
    except (submit.SubmitError, slurm.SlurmError) as err:
        raise SystemExit(f"tapa submit: {err}") from None


def cmd_status(args):
    from tapa_megatron.launch import status

    try:
        status.run(args.run_dir, as_json=args.json, with_slurm=False if args.no_slurm else None)
    except status.StatusError as err:
        raise SystemExit(f"tapa status: {err}") from None


def cmd_data_prepare(args):
    from tapa_megatron.data import prepare

    try:
        prepare.run(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"tapa data prepare: {err}") from None


def cmd_eval(args):
    from tapa_megatron.eval import evaluate

    names = args.names or [f"model{i}" for i in range(len(args.checkpoints))]
    if len(names) != len(args.checkpoints):
        raise SystemExit(f"tapa eval: {len(names)} --names for {len(args.checkpoints)} checkpoints.")
    evaluate(dict(zip(names, args.checkpoints)), args.out, multiples=args.multiples, stride=args.stride,
             max_tokens=args.max_tokens, passkey_trials=args.passkey_trials, bias_pairs=args.bias_pairs,
             report=lambda line: print(line, flush=True))  # flushed: progress shows in logs and pipes too


def cmd_study(args):
    from tapa_megatron.study import run_study

    run_study(args.out, quick=args.quick, only=args.only)


def cmd_demo(args):
    from tapa_megatron.demo import run_demo

    run_demo(args.out, quick=args.quick)


def cmd_bench_attention(args):
    from tapa_megatron.bench import attention

    attention.run(args)


def _add_training_arguments(parser):
    parser.add_argument("recipe", help="a recipe name from recipes/ (e.g. tiny-cpu) or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the recipe, e.g. training.steps=50 model.tapa.alpha=0.2")
    parser.add_argument("--nproc", type=int, default=1,
                        help="spawn this many local processes (gloo on CPU); under torchrun/srun leave it at 1")
    parser.add_argument("--force", action="store_true",
                        help="train in a run_dir that holds another recipe's run (its config.yaml is kept beside)")


def build_parser():
    from tapa_megatron.bench import attention as bench_attention
    from tapa_megatron.data import prepare as data_prepare

    parser = argparse.ArgumentParser(prog="tapa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a TAPA (or RoPE-baseline) GPT from a recipe",
        description="Train from a recipe. The run directory (run_dir) gets config.yaml, checkpoints/ and "
                    "tensorboard/; with checkpoint.resume=auto (the default) running the same command again "
                    "continues from the newest complete checkpoint.")
    _add_training_arguments(train)
    train.set_defaults(handler=cmd_train)

    extend = commands.add_parser(
        "extend", help="continue a shorter-context checkpoint at a longer context (e.g. 8K -> 32K)",
        description="The extension stage: start RECIPE (the longer-context recipe: its seq_length, parallel "
                    "layout, steps and lr) from the weights of --from. The optimizer and lr schedule start afresh "
                    "unless checkpoint.reset_optimizer=false. The TAPA settings stay as the paper keeps them.")
    extend.add_argument("--from", dest="source", required=True,
                        help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    _add_training_arguments(extend)
    extend.set_defaults(handler=cmd_extend)

    submit = commands.add_parser(
        "submit", help="submit a recipe (or a chain: pretrain, then extensions) as Slurm jobs",
        description="Render slurm/train.sbatch for RECIPE and submit it with sbatch; prints the job id, the run "
                    "directory and the log. Jobs checkpoint and requeue themselves before their time limit and "
                    "resume where they stopped. --chain submits stages that each start from the previous "
                    "stage's final checkpoint. docs/slurm.md has the whole story.")
    submit.add_argument("recipe", nargs="?", help="a recipe name from recipes/ or a path to a YAML file")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, for every stage")
    submit.add_argument("--chain", nargs="+", metavar="RECIPE", help="stages, in order (instead of RECIPE)")
    submit.add_argument("--nodes", type=int, default=1)
    submit.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job (gloo)")
    submit.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU)")
    submit.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (data loading, host work)")
    submit.add_argument("--time", required=True, help="time limit of each job, [D-]HH:MM:SS")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--qos", help="sbatch --qos")
    submit.add_argument("--constraint", help="sbatch --constraint (node features, e.g. h100)")
    submit.add_argument("--reservation", help="sbatch --reservation")
    submit.add_argument("--exclusive", action="store_true", help="sbatch --exclusive: whole nodes")
    submit.add_argument("--sbatch-arg", action="append", default=[], metavar="KEY[=VALUE]",
                        help="any other sbatch option, by its long name without dashes (repeatable), e.g. "
                             "--sbatch-arg mail-type=END; options tapa submit sets itself are refused")
    submit.add_argument("--run-dir", help="the run directory (default: the recipe's run_dir); with --chain, "
                                          "the parent of one directory per stage")
    submit.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                        help="USR1 this long before the time limit: checkpoint and requeue (default 300)")
    submit.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                        help="srun: one task per GPU (default); torchrun: one torchrun per node")
    submit.add_argument("--force", action="store_true",
                        help="submit into a run directory that holds another recipe's run")
    submit.add_argument("--dry-run", action="store_true", help="print the batch script(s); submit nothing")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser(
        "status", help="a run's (or a chain's) step, loss, speed, ETA, checkpoint and Slurm jobs",
        description="Where a run stands, from its run directory (config.yaml, progress.json, validation.jsonl, "
                    "checkpoints/, the jobs tapa submit kept in logs/), and each job's state from squeue/sacct "
                    "when Slurm is there. Given a chain's parent directory, every stage in submission order.")
    status.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, or a chain's parent directory")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument("--no-slurm", action="store_true", help="do not ask Slurm; read the run directory only")
    status.set_defaults(handler=cmd_status)

    data = commands.add_parser("data", help="prepare training data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = data_commands.add_parser("prepare", help="text/jsonl (or the bundled novels) -> tokenizer + "
                                       "Megatron indexed dataset", description=data_prepare.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    data_prepare.add_arguments(prepare)
    prepare.set_defaults(handler=cmd_data_prepare)

    evaluation = commands.add_parser(
        "eval", help="long-context evaluation: perplexity at 1x..16x L, passkey, distance bias (JSON, CSV, PNG)",
        description="Evaluate checkpoints side by side on the held-out books of their data directory: "
                    "sliding-window perplexity at multiples of the training length L (window stride "
                    "min(--stride, context/2)), passkey retrieval at those lengths and several depths, and the "
                    "paper's distance-bias histogram (ranges scaled to the model's length). Writes "
                    "OUT/results.json, perplexity.csv and PNG plots.")
    evaluation.add_argument("checkpoints", nargs="+", help="checkpoint or run directories")
    evaluation.add_argument("--names", nargs="+", help="a name per checkpoint (default model0, model1, ...)")
    evaluation.add_argument("--out", required=True, help="output directory")
    evaluation.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                            help="context lengths as multiples of L")
    evaluation.add_argument("--stride", type=int, default=256, help="sliding-window stride (the paper's 256)")
    evaluation.add_argument("--max-tokens", type=int, default=8192, help="tokens of each held-out book scored")
    evaluation.add_argument("--passkey-trials", type=int, default=4, help="random keys per length and depth (0: skip)")
    evaluation.add_argument("--bias-pairs", type=int, default=10000, help="score pairs for the histogram (0: skip)")
    evaluation.set_defaults(handler=cmd_eval)

    demo = commands.add_parser(
        "demo", help="the paper's TAPA vs RoPE comparison in miniature on a CPU (the embedded default)",
        description="Prepare the bundled Gutenberg novels, pretrain a tiny TAPA model and its RoPE twin at L "
                    "tokens, fine-tune both at 4L, evaluate both at L..16L, and write OUT/results.json plus "
                    "tables and plots (recipes/demo-cpu.yaml, demo-cpu-extend.yaml).")
    demo.add_argument("--out", default="demo-out", help="output directory (reused: the corpus is prepared once)")
    demo.add_argument("--quick", action="store_true", help="a few steps only: checks the pipeline end to end")
    demo.set_defaults(handler=cmd_demo)

    study = commands.add_parser("study", help="why TAPA learns slowly at demo scale: pretraining sweeps (docs/study.md)",
                                description="Pretrains the demo model once per variant (learning rate, warm-up, "
                                            "phase scale, alpha, theta; TAPA, RoPE and NoPE) and writes "
                                            "OUT/results.json (resumable) and plots.")
    study.add_argument("--out", default="study-out", help="output directory (reused: finished variants are kept)")
    study.add_argument("--quick", action="store_true", help="a few steps per variant: checks the pipeline")
    study.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    study.set_defaults(handler=cmd_study)

    bench = commands.add_parser("bench", help="benchmarks that print tables (and plots)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    attention = benchmarks.add_parser(
        "attention", help="TAPA attention (Triton, torch path, reference) beside SDPA: ms, TFLOP/s, memory",
        description=bench_attention.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_attention.add_arguments(attention)
    attention.set_defaults(handler=cmd_bench_attention)

    from tapa_megatron.convert import commands as convert_commands  # argparse only; handlers import lazily

    convert = commands.add_parser("convert", help="checkpoints: Hugging Face Llama <-> TAPA Megatron, inspect",
                                  description=convert_commands.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    convert_commands.add_arguments(convert)

    from tapa_megatron.plan import command as plan_command  # formulas only; megatron loads for a preset

    plan = commands.add_parser("plan", help="TP x CP x PP x DP layouts that fit a model at a sequence length, "
                               "with memory per GPU, step time and MFU", description=plan_command.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    plan_command.add_arguments(plan)
    plan.set_defaults(handler=cmd_plan)

    from tapa_megatron import selfcheck as selfcheck_module  # torch only at import; megatron loads when it runs

    selfcheck = commands.add_parser("selfcheck", help="kernels, engines and an extension checked on this machine; "
                                    "writes a JSON report", description=selfcheck_module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    selfcheck.add_argument("--out", required=True, help="where to write the JSON report")
    selfcheck.add_argument("--cpu", action="store_true", help="run on CPU only (what CI runs), even with a GPU")
    selfcheck.set_defaults(handler=cmd_selfcheck)
    return parser


def cmd_selfcheck(args):
    from tapa_megatron import selfcheck

    if not selfcheck.run(args.out, cpu=args.cpu):
        raise SystemExit(1)


def cmd_plan(args):
    from tapa_megatron.plan import command

    command.run(args)


def main(argv=None):
    parser = build_parser()
    # key=value overrides may come after options too (tapa train R --nproc 2 training.steps=5)
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
