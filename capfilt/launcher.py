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
    """This process's place in the job, from torchrun / accelerate (RANK, WORLD_SIZE) or Slurm."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Rank(int(env["RANK"]), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Rank(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]))
    return Rank()


def launcher_local_rank() -> int | None:
    """This process's index on its node, from the launcher: LOCAL_RANK (torchrun, accelerate, --processes), else
    SLURM_LOCALID (plain `srun`, one task per GPU); None when no launcher says."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return None
