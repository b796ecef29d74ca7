"""What the launcher says about this process: its rank in the job and its index on the node (torchrun,
accelerate, Slurm, `--processes`). Reads the environment only; no torch."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1


def current_rank() -> Rank:
    """This process's place in the job, from torchrun / accelerate (RANK, WORLD_SIZE) or Slurm. Under Slurm the
    world is the job step's tasks (SLURM_STEP_NUM_TASKS, set by `srun`), not the allocation's (SLURM_NTASKS):
    the batch script of an `sbatch --ntasks 4` job is one process, though SLURM_NTASKS says 4."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Rank(int(env["RANK"]), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return Rank(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]))
    return Rank()


def job_label() -> str:
    """This process's job as people name it, for the claims `capfilt stats` shows: CAPFILT_JOB_ID, Slurm's job
    (an array job as JOB_TASK) or torchrun's run id; "" when nothing says. Nothing depends on it being unique."""
    env = os.environ
    if env.get("CAPFILT_JOB_ID"):
        return env["CAPFILT_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm {env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm {env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun's default id is "none"
        return f"torchrun {env['TORCHELASTIC_RUN_ID']}"
    return ""


def launcher_local_rank() -> int | None:
    """This process's index on its node, from the launcher: LOCAL_RANK (torchrun, accelerate, --processes), else
    SLURM_LOCALID (plain `srun`, one task per GPU); None when no launcher says."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None
