"""Several processes share one job through the output directory: together they write exactly what one process
writes, and a job whose process was killed finishes, on restart, to the same bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import demo_samples, read_json, write_tar
from typer.testing import CliRunner

from capfilt.bootstrap.claims import Claims, job_id
from capfilt.cli import app
from capfilt.errors import CapfiltError
from capfilt.launcher import Rank, current_rank


@pytest.fixture
def shards(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        write_tar(d / f"part-{i:05d}.tar", demo_samples(4, start=4 * i))
    return d


def _args(shards, out, models, *extra):
    return ["bootstrap", str(shards), "--out", str(out), "--captioner", models["blip_captioner"], "--filter",
            models["blip_itm"], "--batch-size", "3", "--workers", "0", "--num-captions", "2", "--quiet", *extra]


def _outputs(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}
    for p in out.glob("*_stats.json"):
        files[p.name] = {k: v for k, v in read_json(p).items() if k not in ("duration_s", "samples_per_s")}
    return files


def test_claims_are_won_once_per_job_and_never_for_a_done_shard(tmp_path):
    a, b = Claims(tmp_path, "job-1"), Claims(tmp_path, "job-1")
    assert a("part-00000") and not b("part-00000")
    assert Claims(tmp_path, "job-2")("part-00000")  # a new attempt is not blocked by the old one's claims
    (tmp_path / "part-00001_stats.json").write_text("{}")
    assert not a("part-00001")  # done already
    a.release("part-00000")
    assert b("part-00000")


def test_a_claim_survives_a_finished_peer_removing_the_job_directory(tmp_path, monkeypatch):
    """A peer that finishes removes the job's emptied claim directory; one about to claim must not crash on it."""
    claims, real_open, removed = Claims(tmp_path, "job-1"), os.open, []

    def open_after_peer_closed(path, *args):
        if not removed:
            removed.append(Claims(tmp_path, "job-1").close())  # between our mkdir and our open
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", open_after_peer_closed)
    assert claims("part-00000") and removed and (tmp_path / ".claims" / "job-1" / "part-00000").exists()


def test_a_rank_that_meets_a_peers_fresh_manifest_joins_the_run(tmp_path, monkeypatch):
    """Ranks start together on an empty --out: one writes the manifest while another is looking at the directory.
    The late one must join the run, not call the directory foreign."""
    from capfilt.data.schema import MANIFEST
    from capfilt.data.writer import prepare_output

    out, settings, real_iterdir = tmp_path / "out", {"batch_size": 3}, Path.iterdir

    def listing_then_peer_writes(self):
        listing = list(real_iterdir(self))
        if self == out and not (out / MANIFEST).exists():
            (out / MANIFEST).write_text(json.dumps({"settings": settings}))  # the peer, just after our look
        return iter(listing + [out / MANIFEST])

    monkeypatch.setattr(Path, "iterdir", listing_then_peer_writes)
    prepare_output(out, settings, overwrite=False, shards=["part-00000"])
    monkeypatch.setattr(Path, "iterdir", real_iterdir)
    with pytest.raises(CapfiltError, match="other settings"):
        prepare_output(out, {"batch_size": 4}, overwrite=False, shards=["part-00000"])


def test_job_id_comes_from_the_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CAPFILT_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_RESTART_COUNT", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert current_rank() == Rank(0, 1) and job_id(current_rank()) != job_id(current_rank())  # a fresh attempt
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CapfiltError, match="CAPFILT_JOB_ID"):
        job_id(current_rank())
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert current_rank() == Rank(1, 2) and job_id(current_rank()) == "torchrun-abc-1"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert job_id(current_rank()) == "torchrun-abc-1-requeue3"


def test_each_process_takes_the_gpu_of_its_launchers_local_rank(monkeypatch):
    """torchrun / accelerate / --processes set LOCAL_RANK; plain `srun` (one task per GPU) only SLURM_LOCALID."""
    import torch

    from capfilt.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert str(resolve_device("cuda")) == "cuda"
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert str(resolve_device("cuda")) == str(resolve_device("auto")) == "cuda:2"
    monkeypatch.setenv("SLURM_LOCALID", "5")  # more tasks than visible GPUs: they share round-robin
    assert str(resolve_device("cuda")) == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun started under srun: its own local rank counts
    assert str(resolve_device("cuda")) == "cuda:3"
    assert str(resolve_device("cuda:0")) == "cuda:0" and str(resolve_device("cpu")) == "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_without_a_launcher_id_agree_on_each_run(tmp_path):
    """MASTER_ADDR / MASTER_PORT only (rank 0 serves the store): every run in a process agrees on a new id."""
    code = ("from capfilt.bootstrap.claims import job_id; from capfilt.launcher import current_rank; "
            "me = current_rank(); print(job_id(me), job_id(me))")
    env = {k: v for k, v in os.environ.items() if k not in ("CAPFILT_JOB_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    ranks = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(2)]
    (first, second), (first_1, second_1) = (rank.communicate(timeout=120)[0].split() for rank in ranks)
    assert (first, second) == (first_1, second_1) and first != second and first.startswith("group-")


def test_two_processes_write_exactly_what_one_writes(shards, tmp_path, tiny_models):
    runner = CliRunner()
    one = runner.invoke(app, _args(shards, tmp_path / "one", tiny_models))
    assert one.exit_code == 0, one.output
    two = runner.invoke(app, _args(shards, tmp_path / "two", tiny_models, "--processes", "2"))
    assert two.exit_code == 0, two.output
    assert "6 shards done" in two.output
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")
    assert not (tmp_path / "two" / ".claims").exists() and not list((tmp_path / "two").glob("*.tmp"))


def test_a_killed_rank_leaves_a_job_that_a_restart_completes(shards, tmp_path, tiny_models):
    """Two launched ranks (as torchrun starts them: RANK, WORLD_SIZE, a shared run id); rank 1 is killed as soon
    as the job has finished a shard, mid-way through its own; the restarted job ends identical to one process."""
    reference = tmp_path / "reference"
    assert CliRunner().invoke(app, _args(shards, reference, tiny_models)).exit_code == 0
    out = tmp_path / "out"

    def launch(rank: int, run_id: str, world: int = 2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "TORCHELASTIC_RUN_ID": run_id, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-m", "capfilt", *_args(shards, out, tiny_models)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ranks = [launch(0, "first"), launch(1, "first")]
    deadline = time.time() + 120
    while not list(out.glob("*_stats.json")) and time.time() < deadline and ranks[1].poll() is None:
        time.sleep(0.05)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[1].wait()
    assert ranks[0].wait(timeout=300) == 0, ranks[0].stderr.read().decode()[-2000:]

    restart = [launch(0, "second"), launch(1, "second")]  # torchrun's next attempt: a new id for the claims
    for rank in restart:
        assert rank.wait(timeout=300) == 0, rank.stderr.read().decode()[-2000:]
    assert _outputs(out) == _outputs(reference)
    assert not list(out.glob("*.tmp"))
    assert not (out / ".claims").exists()  # the killed attempt's claim went when the job finished


def test_torchrun_without_a_run_id_agrees_on_one_job(shards, tmp_path, tiny_models):
    """`torchrun --nproc-per-node 2` and `accelerate launch --multi_gpu` leave the run id at "none": the ranks
    agree on a job id through the launcher's store, split the shards and exit (no hang on a second agreement)."""
    reference = tmp_path / "reference"
    assert CliRunner().invoke(app, _args(shards, reference, tiny_models)).exit_code == 0
    launcher_vars = ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "CAPFILT_JOB_ID", "SLURM_JOB_ID")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())]
    job = subprocess.run([*launcher, "-m", "capfilt", *_args(shards, tmp_path / "out", tiny_models)],
                         env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert job.returncode == 0, job.stderr[-2000:]
    done = [int(n) for n in re.findall(r"this run: (\d) shards done", job.stdout)]
    assert len(done) == 2 and sum(done) == 6, job.stdout  # each rank's own share, no shard twice
    assert _outputs(tmp_path / "out") == _outputs(reference)
