"""Which shard next, for `caption` / `filter` / `bootstrap` over processes and nodes: the job id and shard claims.

Work is split by shard, dynamically: a process (or one of its DataLoader workers) claims the next input shard by
creating `OUT/.claims/JOB/NAME` with O_CREAT | O_EXCL, which exactly one creator wins, also on NFS. Fast
processes therefore take more shards, and nobody needs to talk to anybody: the same code runs under `torchrun`,
`accelerate launch`, `srun`, or `--processes N`. A shard is done when its stats file exists (written last); a
claim is dropped once that is so, and a claimer checks for it after winning, so a finished shard is never redone.

JOB names one attempt of one job, agreed from the launcher's environment (torchrun's run id and restart count,
Slurm's job, step and requeue count, or `CAPFILT_JOB_ID`), else drawn by rank 0 and read by the others from the
launcher's store, once per run. A restarted job is a new attempt, so the claims of a dead one block nothing: it
redoes exactly the shards without a stats file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from capfilt.data.schema import CLAIMS, stats_path
from capfilt.errors import CapfiltError
from capfilt.launcher import Rank


def job_id(me: Rank) -> str:
    """The name of this attempt of the job, the same in all of its processes. Call it once per run, in every
    process alike: without a launcher id it is agreed by message."""
    env = os.environ
    if env.get("CAPFILT_JOB_ID"):
        return _safe(env["CAPFILT_JOB_ID"])
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # torchrun's default id is "none": not unique
        job = f"torchrun-{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    elif env.get("SLURM_JOB_ID"):
        job = f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
    elif me.world_size == 1:
        return uuid.uuid4().hex
    elif env.get("MASTER_ADDR"):
        job = f"group-{_agree_on_new_id(me)}"
    else:
        raise CapfiltError("several processes but no job id to agree on: set CAPFILT_JOB_ID to one value for all")
    if env.get("SLURM_RESTART_COUNT"):  # a requeued Slurm job keeps its job id (and torchrun its run id)
        job += f"-requeue{env['SLURM_RESTART_COUNT']}"
    return _safe(job)


_agreed = 0  # ids this process has agreed on: every rank's n-th run uses the n-th key
_store = None  # kept for the process's life: when rank 0 serves it, a peer's next agreement must find it up


def _agree_on_new_id(me: Rank) -> str:
    """Rank 0 draws the id and the others read it: over the program's process group if it has one, else through
    the launcher's store at MASTER_ADDR:MASTER_PORT (torchrun's agent store, or one rank 0 serves). No process
    group is made, so none is left for a later `init_process_group` to trip over, and a second run agrees anew
    (a default group initialised again on torchrun's store meets the first one's keys, and can hang)."""
    global _agreed, _store
    import torch.distributed as dist

    drawn = uuid.uuid4().hex
    if dist.is_initialized():
        box = [drawn]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://", rank=me.rank, world_size=me.world_size))
    store = _store
    # torchrun's store may outlive a restart of the processes, whose count then starts again at 0
    key = f"capfilt/job-id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_agreed}"
    _agreed += 1
    if me.rank == 0:
        store.set(key, drawn)
        store.wait([f"{key}/read/{r}" for r in range(1, me.world_size)])  # all have it before anyone goes on
        return drawn
    drawn = store.get(key).decode()  # waits for rank 0
    store.set(f"{key}/read/{me.rank}", "")
    return drawn


def _safe(job: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in job)


class Claims:
    """`claims(name)` -> True when this process may do shard `name` (it won the claim and the shard is not done).
    Picklable, so DataLoader workers claim for themselves."""

    def __init__(self, out: Path, job: str):
        self.out, self.dir = Path(out), Path(out) / CLAIMS / job

    def __call__(self, name: str) -> bool:
        for _ in range(100):
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return False
            except FileNotFoundError:  # a process that finished removed the emptied directory meanwhile: remake it
                continue
        else:
            raise CapfiltError(f"cannot create a claim in {self.dir}: it keeps disappearing")
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        # Finished by this job after our listing: its claim had already been dropped.
        if stats_path(self.out, name).exists():
            self.release(name)
            return False
        return True

    def release(self, name: str) -> None:
        """After the shard's stats file is written (or its failure recorded)."""
        try:
            (self.dir / name).unlink()
        except FileNotFoundError:
            pass

    def close(self, job_done: bool = False) -> None:
        """Drop this attempt's claim directory once empty. When every shard of the output is done (`job_done`),
        the claims that killed processes of this or earlier attempts left go too: none can matter any more, and a
        finished output holds only outputs. Otherwise they stay, harmlessly."""
        if job_done:
            shutil.rmtree(self.dir.parent, ignore_errors=True)  # a peer still claiming remakes what it needs
            return
        for directory in (self.dir, self.dir.parent):
            try:
                directory.rmdir()
            except OSError:
                break
