"""Launching runs on clusters: Slurm batch scripts and `tapa submit` (submit.py, script.py, slurm.py),
run-directory rules (rundir.py), and the preemption signals a run stops on (signals.py). How each rank
finds its place in the world (torchrun, srun, MPI) is train.distributed.detect_launch."""
