"""tapa submit: a recipe, or a chain of them, as Slurm jobs.

    tapa submit tiny-cpu --nodes 1 --gpus-per-node 0 --tasks-per-node 2 --time 01:00:00
    tapa submit --chain pretrain extend-32k extend-128k --nodes 8 --gpus-per-node 8 --time 24:00:00

Everything is checked before anything is submitted: the recipes and their overrides (train/validate.py,
as `tapa train` checks them: values, data directory and tokenizer, what each stage starts from, each
stage of a chain against the one before), the layout against nodes x tasks per node, the time limit
against the signal lead, the partition, and each run directory (another recipe's run there is refused
unless --force; a job of it still in the queue is refused). A dry run works without a configured Slurm:
what only the cluster can answer is then left unchecked, and it says so. Each
job's batch script (slurm/train.sbatch, filled in) is kept as RUN/logs/slurm-JOBID.sbatch beside its log
RUN/logs/slurm-JOBID.out. Stage k+1 of a chain waits for stage k to succeed (afterok) and starts from its
final checkpoint.
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tapa_megatron.config import ConfigError, load_config
from tapa_megatron.launch import rundir, script, slurm
from tapa_megatron.train import RunConfig
from tapa_megatron.train.errors import RunError
from tapa_megatron.train.validate import validate_run

DEFAULT_SIGNAL_LEAD = 300  # seconds before the time limit: enough to finish a step and write a checkpoint
MAX_SIGNAL_LEAD = 65535  # sbatch --signal takes at most this
SIGNAL_GRANULARITY = 60  # Slurm may send the signal up to a minute earlier than asked
LAUNCHERS = ("srun", "torchrun")


class SubmitError(ValueError):
    pass


@dataclass
class JobRequest:
    """The allocation asked of Slurm (the command line of tapa submit)."""
    nodes: int
    gpus_per_node: int
    time: str  # [D-]HH:MM:SS
    tasks_per_node: int | None = None  # default: one per GPU
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    signal_lead: int = DEFAULT_SIGNAL_LEAD
    launcher: str = "srun"
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    exclusive: bool = False
    sbatch_args: tuple = ()  # further sbatch options, "KEY=VALUE" or "KEY" (a flag), as --sbatch-arg gives them

    @property
    def ranks_per_node(self):
        return self.tasks_per_node or self.gpus_per_node

    @property
    def world_size(self):
        return self.nodes * self.ranks_per_node


@dataclass
class Stage:
    """One job: a recipe with its overrides, the run directory it trains in, and its batch script."""
    cfg: RunConfig
    arguments: list  # the batch script's arguments: the recipe, then key=value overrides
    run_dir: Path
    conflict: str | None  # another recipe's run in run_dir, accepted with --force
    status: str  # what the run will do there: a new run, or resume from a checkpoint
    script: str = ""


def time_limit_seconds(text):
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", text)
    if match is None:
        raise SubmitError(f"--time {text!r} is not [D-]HH:MM:SS; write e.g. 04:00:00 or 1-12:00:00.")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    if minutes > 59 or seconds > 59 or (match.group(1) is not None and hours > 23):
        raise SubmitError(f"--time {text!r}: minutes and seconds run from 00 to 59 (and hours to 23 after a day "
                          "count); write e.g. 01:39:00 for 99 minutes.")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# sbatch options tapa submit writes itself, and where each comes from: --sbatch-arg may not set them.
OWN_OPTIONS = {
    "job-name": "the recipe's name", "nodes": "--nodes", "ntasks-per-node": "--tasks-per-node",
    "ntasks": "--nodes x --tasks-per-node", "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task",
    "time": "--time", "signal": "--signal-lead", "requeue": "the requeue on USR1", "open-mode": "one log across "
    "restarts", "output": "the run's logs/slurm-%j.out", "chdir": "the directory tapa submit runs in",
    "partition": "--partition", "account": "--account", "qos": "--qos", "constraint": "--constraint",
    "reservation": "--reservation", "exclusive": "--exclusive", "dependency": "--chain",
    "kill-on-invalid-dep": "--chain", "parsable": "tapa submit", "wrap": "the batch script",
}


def sbatch_option(text):
    """("--key=value" or "--key") from a --sbatch-arg KEY=VALUE or KEY; SubmitError when sbatch could not take it
    or tapa submit sets that option itself."""
    key, has_value, value = text.partition("=")
    key = key.removeprefix("--")
    if not re.fullmatch(r"[a-z][a-z0-9-]+", key):
        raise SubmitError(f"--sbatch-arg {text!r}: give sbatch's long option name without its dashes, as KEY=VALUE "
                          "or KEY for a flag, e.g. --sbatch-arg mail-type=END or --sbatch-arg overcommit.")
    if key in OWN_OPTIONS:
        raise SubmitError(f"--sbatch-arg {text!r}: tapa submit sets --{key} itself (from {OWN_OPTIONS[key]}); "
                          "drop it here.")
    if has_value and (not value or any(c in value for c in "\n\r")):
        raise SubmitError(f"--sbatch-arg {text!r}: the value after = is empty or spans lines.")
    return f"--{key}={value}" if has_value else f"--{key}"


def _extra_options(job):
    """The pass-through sbatch options of job, as #SBATCH options, checked."""
    options = []
    for name in ("qos", "constraint", "reservation"):
        value = getattr(job, name)
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise SubmitError(f"--{name} {value!r}: give one {name} name with no spaces.")
        if value is not None:
            options.append(f"--{name}={value}")
    if job.exclusive:
        options.append("--exclusive")
    given = [sbatch_option(text) for text in job.sbatch_args]
    keys = [option.partition("=")[0] for option in given]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise SubmitError(f"--sbatch-arg gives {repeated[0]} more than once; keep one.")
    return options + given


def check_job(job):
    if job.nodes < 1:
        raise SubmitError(f"--nodes {job.nodes}: a job needs at least one node.")
    if job.gpus_per_node < 0 or (job.tasks_per_node is not None and job.tasks_per_node < 1):
        raise SubmitError("--gpus-per-node must be 0 or more and --tasks-per-node 1 or more.")
    if job.ranks_per_node == 0:
        raise SubmitError("--gpus-per-node 0 is a CPU job: say how many ranks (gloo) each node runs with "
                          "--tasks-per-node N.")
    if job.launcher not in LAUNCHERS:
        raise SubmitError(f"--launcher {job.launcher!r} is unknown; use {' or '.join(LAUNCHERS)}.")
    if not 0 < job.signal_lead <= MAX_SIGNAL_LEAD:
        raise SubmitError(f"--signal-lead {job.signal_lead}: give 1 to {MAX_SIGNAL_LEAD} seconds (Slurm's limit).")
    _extra_options(job)
    limit = time_limit_seconds(job.time)
    if limit < job.signal_lead + SIGNAL_GRANULARITY:
        raise SubmitError(
            f"--time {job.time} ({limit} s) is shorter than the signal lead ({job.signal_lead} s, --signal-lead) "
            f"plus Slurm's {SIGNAL_GRANULARITY} s signal granularity: the training would be told to stop as it "
            "starts. Ask for more time, or a shorter --signal-lead.")


def _stage_run_dir(cfg, run_dir, chained):
    if run_dir is None:
        return Path(cfg.run_dir).absolute()
    return (Path(run_dir) / cfg.name if chained else Path(run_dir)).absolute()


def plan(recipes, overrides, job, run_dir=None, force=False):
    """The stages for recipes (paths), checked; nothing is written or submitted. Stage k > 0 starts from
    stage k-1's final checkpoint. With several recipes, run_dir is the parent of one directory per stage."""
    check_job(job)
    stages = []
    previous = None  # what the stage before leaves: the start of the next one
    for recipe in recipes:
        arguments = list(overrides)
        if stages:
            arguments.append(f"checkpoint.init_from={stages[-1].run_dir}")
        try:
            cfg = load_config(RunConfig, recipe, arguments)
        except ConfigError as err:
            raise SubmitError(f"{recipe}: {err}") from None
        stage_dir = _stage_run_dir(cfg, run_dir, chained=len(recipes) > 1)
        cfg.run_dir = str(stage_dir)
        arguments.append(f"run_dir={stage_dir}")
        try:  # a CPU job runs what this machine can run (gloo, no CUDA); GPU nodes check CUDA themselves
            previous = validate_run(cfg, job.world_size, this_machine=job.gpus_per_node == 0, previous=previous)
        except RunError as err:
            raise SubmitError(f"{recipe} on {job.nodes} node(s) x {job.ranks_per_node} tasks: {err}") from None
        if any(stage.run_dir == stage_dir for stage in stages):
            raise SubmitError(f"two stages of the chain would train in {stage_dir}: give each recipe its own "
                              "name, or submit them with --run-dir PARENT (one directory per stage name).")
        conflict = rundir.recipe_conflict(cfg)
        if conflict and not force:
            raise SubmitError(f"{conflict}. Choose another --run-dir, or pass --force to train {cfg.name!r} there "
                              "anyway (the old config.yaml is kept beside; the newest checkpoint there is resumed).")
        stages.append(Stage(cfg, [str(Path(recipe).absolute()), *arguments], stage_dir, conflict,
                            rundir.describe(stage_dir)))
    for stage in stages:
        stage.script = script.render(_directives(job, stage), stage.arguments,
                                     {"TAPA_PYTHON": sys.executable, "TAPA_LAUNCHER": job.launcher})
    return stages


def _directives(job, stage):
    lead = job.signal_lead
    directives = [
        (f"--job-name={stage.cfg.name}", None),
        (f"--nodes={job.nodes}", None),
        (f"--ntasks-per-node={job.ranks_per_node}", "one task per GPU" if job.gpus_per_node else "gloo ranks (CPU)"),
    ]
    if job.gpus_per_node:
        directives.append((f"--gpus-per-node={job.gpus_per_node}", None))
    if job.cpus_per_task:
        directives.append((f"--cpus-per-task={job.cpus_per_task}", "OMP_NUM_THREADS follows it"))
    directives += [
        (f"--time={job.time}", None),
        (f"--signal=B:USR1@{lead}", f"USR1 to this script {lead} s before the time limit: checkpoint, requeue"),
        ("--requeue", "lets the script requeue the job"),
        ("--open-mode=append", "one log across restarts"),
        (f"--output={stage.run_dir}/logs/slurm-%j.out", None),
        (f"--chdir={Path.cwd()}", "the recipe's relative paths are read from here"),
    ]
    if job.partition:
        directives.append((f"--partition={job.partition}", None))
    if job.account:
        directives.append((f"--account={job.account}", None))
    directives += [(option, None) for option in _extra_options(job)]
    return directives


def check_cluster(stages, job):
    """What only the cluster knows: the partition exists, Slurm would take the job as asked (sbatch --test-only:
    QOS, constraint, reservation, limits), and no job of these run dirs is still queued."""
    if job.partition:
        known = slurm.partitions()
        if job.partition not in known:
            raise SubmitError(f"unknown partition {job.partition!r}; this cluster has: {', '.join(known)} "
                              "(sinfo lists them).")
    try:
        slurm.test_only(stages[0].script)  # every stage asks for the same allocation
    except slurm.SlurmError as err:
        raise SubmitError(f"Slurm would not take the job ({err}); check the options (sbatch --test-only tries "
                          "them without submitting).") from None
    for stage in stages:
        kept = sorted((stage.run_dir / "logs").glob("slurm-*.sbatch"))
        ids = [path.stem.removeprefix("slurm-") for path in kept]
        active = slurm.active_jobs([i for i in ids if i.isdigit()])
        if active:
            raise SubmitError(f"job {active[0]} of run dir {stage.run_dir} is still queued or running: wait for it "
                              f"or `scancel {active[0]}`, then submit again (two jobs must not train one run).")


def dependency_options(previous_job):
    """sbatch options that make a stage wait for the one before (its job id) to succeed."""
    return [f"--dependency=afterok:{previous_job}", "--kill-on-invalid-dep=yes"] if previous_job else []


def submit(stages, say=print):
    """Submit the stages in order, each after the previous one; returns the job ids."""
    submitted = []
    for stage in stages:
        logs = stage.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the log's directory
        kept_config = rundir.set_aside_config(stage.run_dir) if stage.conflict else None
        options = dependency_options(submitted[-1] if submitted else None)
        try:
            job_id = slurm.sbatch(stage.script, options)
        except slurm.SlurmError as err:
            if kept_config is not None:
                kept_config.rename(stage.run_dir / rundir.CONFIG_NAME)
            earlier = f" (jobs {', '.join(submitted)} of the earlier stages are queued; scancel them if the chain " \
                      "should not run)" if submitted else ""
            raise SubmitError(f"{err}{earlier}") from None
        (logs / f"slurm-{job_id}.sbatch").write_text(stage.script)
        after = f", after job {submitted[-1]} succeeds" if submitted else ""
        say(f"submitted job {job_id}: {stage.cfg.name}{after}")
        say(f"  run dir  {stage.run_dir} ({stage.status})")
        if kept_config is not None:
            say(f"  --force: the previous run's config is kept as {kept_config}")
        say(f"  log      {logs / f'slurm-{job_id}.out'}")
        say(f"  script   {logs / f'slurm-{job_id}.sbatch'}")
        submitted.append(job_id)
    return submitted


def run(recipes, overrides, job, run_dir=None, force=False, dry_run=False):
    """tapa submit: plan, check, then print the scripts (dry run) or submit them."""
    stages = plan(recipes, overrides, job, run_dir=run_dir, force=force)
    if not dry_run:
        check_cluster(stages, job)
        return submit(stages)
    if slurm.available():
        try:
            check_cluster(stages, job)
        except slurm.SlurmError as err:
            print(f"# not checked with Slurm, which did not answer ({err}): the partition, and jobs of these run "
                  "directories still queued", file=sys.stderr)
    if len(stages) > 1:
        print("\n".join(chain_lines(stages)) + "\n")
    for index, stage in enumerate(stages):
        if len(stages) > 1:
            print(f"# ==== stage {index + 1} of {len(stages)}: {stage.cfg.name} ({stage.status})")
            job = f"$JOB_{index}" if index else None
            print(f"# submitted as: sbatch {' '.join(['--parsable', *dependency_options(job)])} < script below"
                  f"{f'  (prints JOB_{index + 1})' if index + 1 < len(stages) else ''}")
        else:
            print(f"# {stage.cfg.name}: {stage.status}", file=sys.stderr)
        print(stage.script)
    return []


def chain_lines(stages):
    """The dry run's summary of a chain: which job waits on which, and where each starts from."""
    lines = [f"# chain of {len(stages)} jobs: each waits for the one before to succeed (sbatch "
             "--dependency=afterok:JOB --kill-on-invalid-dep=yes: a failed stage cancels the rest)"]
    for index, stage in enumerate(stages):
        if index == 0:
            start = f"starts when Slurm schedules it; {stage.status}"
        else:
            start = (f"waits on stage {index} (afterok:$JOB_{index}), then starts from its final checkpoint "
                     f"({stages[index - 1].run_dir}/checkpoints)")
        lines.append(f"#   stage {index + 1} ($JOB_{index + 1}) {stage.cfg.name}: {stage.run_dir}; {start}")
    return lines
