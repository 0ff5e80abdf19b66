"""The batch script of a job: slurm/train.sbatch with its #SBATCH block replaced by the job's directives
and its arguments (recipe, overrides) and settings written in, so that the copy kept in the run directory
reads like the template and can be submitted again by hand with plain `sbatch`.
"""

import shlex
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"


def render(directives, arguments, settings, template=TEMPLATE):
    """directives: (option, comment) pairs for #SBATCH lines; arguments: the script's $1, $2, ...;
    settings: shell variables the template reads (TAPA_PYTHON, TAPA_LAUNCHER)."""
    lines = Path(template).read_text().splitlines()
    block = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not block:
        raise ValueError(f"{template} has no #SBATCH lines to replace")
    width = max((len(option) for option, comment in directives if comment), default=0)
    header = [
        "#!/bin/bash",
        f"# Written by `tapa submit` from slurm/train.sbatch on {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        "# Submit it again by hand with: sbatch THIS_FILE (the run resumes from its newest complete checkpoint).",
        *(f"#SBATCH {option:<{width}}  # {comment}" if comment else f"#SBATCH {option}"
          for option, comment in directives),
        "",
        f"set -- {shlex.join(str(a) for a in arguments)}",
        *(f"{name}={shlex.quote(str(value))}" for name, value in settings.items()),
    ]
    return "\n".join(header + lines[block[-1] + 1:]) + "\n"
