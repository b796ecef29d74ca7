"""`--processes N`: one launch on one machine split into N local processes (spawned; one per GPU when there are
GPUs), which claim shards like the processes of any launcher. Builds the models in each process and merges the
summaries."""

from __future__ import annotations

import multiprocessing
import os
import queue
import uuid
from dataclasses import replace

from capfilt import log
from capfilt.bootstrap.pipeline import run
from capfilt.data.writer import OVERWRITE_ALONE
from capfilt.errors import CapfiltError
from capfilt.launcher import current_rank
from capfilt.models.captioner import load_captioner
from capfilt.models.scorer import Scorer


def run_job(config, captioner_config=None, scorer_config=None, selection=None, processes: int = 1):
    """Build the models and run; with `processes` > 1, in that many local processes (spawned, one per GPU when
    there are GPUs), which split the shards between them. Returns this process's (or rank 0's) RunSummary."""
    if processes < 1:
        raise CapfiltError("--processes must be at least 1")
    if processes == 1:
        return _run_here(config, captioner_config, scorer_config, selection)
    if current_rank().world_size > 1:
        raise CapfiltError("--processes is for a single launch; under torchrun / accelerate / srun leave it at 1")
    if config.overwrite:
        raise CapfiltError(OVERWRITE_ALONE)
    env = {"CAPFILT_JOB_ID": f"local-{uuid.uuid4().hex}", "WORLD_SIZE": str(processes)}
    context = multiprocessing.get_context("spawn")  # CUDA and fork do not mix
    results = context.Queue()
    children = [context.Process(target=_child, args=(rank, env, config, captioner_config, scorer_config,
                                                     selection, results)) for rank in range(processes)]
    for child in children:
        child.start()
    summaries = {}
    while any(child.is_alive() for child in children) or not results.empty():
        try:
            rank, summary = results.get(timeout=0.5)  # drained while they run: a full pipe would block a child
            summaries[rank] = summary
        except queue.Empty:
            pass
    for child in children:
        child.join()
    errors = [s for s in summaries.values() if isinstance(s, CapfiltError)]
    if errors:
        raise errors[0]
    failed = [r for r, c in enumerate(children) if c.exitcode != 0]
    if failed:
        raise CapfiltError(f"process(es) {failed} of {processes} failed (exit codes "
                           f"{[children[r].exitcode for r in failed]}); rerun the same command to finish the job")
    return _merge(list(summaries.values()))


def _child(rank, env, config, captioner_config, scorer_config, selection, results) -> None:
    import torch

    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    log.configure()  # now with this child's rank in front
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(env["WORLD_SIZE"])))
    if rank != 0:
        config = replace(config, progress=False)
    try:
        results.put((rank, _run_here(config, captioner_config, scorer_config, selection)))
    except CapfiltError as exc:  # a user error (bad model, bad output dir): the parent reports it as its own
        results.put((rank, exc))


def _run_here(config, captioner_config, scorer_config, selection):
    captioner = load_captioner(captioner_config) if captioner_config is not None else None
    scorer = Scorer(scorer_config) if scorer_config is not None else None
    return run(config, captioner, scorer, selection)


def _merge(summaries):
    total = summaries[0]
    for other in summaries[1:]:
        total.shards_done += other.shards_done
        total.shards_failed.update(other.shards_failed)
        total.samples += other.samples
        total.written += other.written
        total.duration_s = max(total.duration_s, other.duration_s)
    return total
