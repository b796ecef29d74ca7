"""Many independent jobs on one --out (different job ids, any launcher): each shard is computed once while its
holder lives, a dead holder's shard is taken over once its claim is stale, a holder that wakes after losing its
claim changes nothing, and the output is the bytes one process writes. Real processes (`python -m capfilt`), not
threads: claims must hold between programs that share nothing but the directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import bad_samples, demo_samples, read_json, strip_none, write_tar

from capfilt.bootstrap.claims import BUSY, CLAIMED, DONE, MINE, Claims, tidy
from capfilt.bootstrap.stats import format_report, summarize

SHARDS = 12
LEASE = "2"  # --claim-timeout of the processes that get stopped or killed: seconds, so the test stays short


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 shards of 4 samples; every third one also holds a corrupt image (its parquet detail must not differ
    between runs) and a truncated JPEG."""
    d = tmp_path_factory.mktemp("in")
    good, bad = demo_samples(4 * SHARDS), {s["__key__"]: s for s in strip_none(bad_samples())}
    for i in range(SHARDS):
        samples = good[4 * i: 4 * i + 4]
        if i % 3 == 0:
            samples = samples[:2] + [{**bad["corrupt"], "__key__": f"corrupt{i}"}] + samples[2:] + [
                {**bad["truncjpg"], "__key__": f"truncjpg{i}"}]
        write_tar(d / f"part-{i:05d}.tar", samples)
    return d


def _args(shards: Path, out: Path, models: dict[str, str], *extra: str) -> list[str]:
    # --threshold 0 keeps every sample, so a shard's tar is open from its first batch: "mid-shard" is visible.
    return ["bootstrap", str(shards), "--out", str(out), "--captioner", models["blip_captioner"], "--filter",
            models["blip_itm"], "--batch-size", "1", "--num-captions", "1", "--threshold", "0", "--quiet", *extra]


def _outputs(out: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".parquet")}
    for p in out.glob("*_stats.json"):
        files[p.name] = {k: v for k, v in read_json(p).items() if k not in ("duration_s", "samples_per_s")}
    return files


@pytest.fixture(scope="module")
def reference(shards, tiny_models, tmp_path_factory) -> dict[str, bytes]:
    """What one process writes: a process like the jobs' (one torch thread each: another thread count may round
    a model's sums differently, and so sample other captions)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    job = Job("reference", shards, out, tiny_models, "--workers", "0")
    assert job.wait() == 0, job.stderr[-3000:]
    files = _outputs(out)
    assert len([n for n in files if n.endswith("_stats.json")]) == SHARDS
    return files


class Job:
    """One `python -m capfilt bootstrap` process with its own job id, as a separate Slurm job would be."""

    def __init__(self, job_id: str, shards: Path, out: Path, models: dict[str, str], *extra: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(CAPFILT_JOB_ID=job_id, OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, "-m", "capfilt", *_args(shards, out, models, *extra)],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.process.pid
        self.stdout = self.stderr = ""

    def wait(self, timeout: float = 240) -> int:
        self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def shards_done(self) -> int:
        return int(re.search(r"this run: (\d+) shards done", self.stdout)[1])


def _mid_shard(out: Path, job: Job, deadline_s: float = 120) -> str:
    """The shard `job` is writing now: its own temporary tar exists and the shard has no stats file yet."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        assert job.process.poll() is None, "the job ended before it was caught mid-shard"
        for tmp in out.glob(f"*.tar.{job.pid}-*.tmp"):
            shard = tmp.name.split(".tar.")[0]
            if not (out / f"{shard}_stats.json").exists():
                return shard
        time.sleep(0.01)
    raise AssertionError("never caught the job mid-shard")


def _catch_mid_shard(out: Path, job: Job, sig: int) -> str:
    """Send `sig` to `job` while it is writing a shard (and check it still was, once the signal landed)."""
    for _ in range(20):
        shard = _mid_shard(out, job)
        job.process.send_signal(sig)
        time.sleep(0.05)
        if not (out / f"{shard}_stats.json").exists():
            return shard
        if sig == signal.SIGSTOP:  # it finished in between: let it go on, and catch it on its next shard
            job.process.send_signal(signal.SIGCONT)
        else:
            raise AssertionError("the job finished its shard before the signal landed")
    raise AssertionError("never caught the job mid-shard")


def _clean(out: Path) -> None:
    names = [p.name for p in out.iterdir()]
    claims = sorted(str(p.relative_to(out)) for p in (out / ".claims").rglob("*"))
    assert ".claims" not in names and not [n for n in names if n.endswith(".tmp")], (names, claims)


def test_three_jobs_compute_each_shard_once_and_write_one_process_bytes(shards, reference, tmp_path, tiny_models):
    out = tmp_path / "out"
    # Two of them with two decode workers, each worker claiming shards itself: a worker waiting for a shard
    # another job holds must not hold up its process's other worker (the DataLoader takes batches as they come).
    jobs = [Job(job_id, shards, out, tiny_models, "--workers", workers) for job_id, workers in
            (("A", "2"), ("B", "2"), ("C", "1"))]
    for job in jobs:
        assert job.wait() == 0, job.stderr[-3000:]
    # Every shard computed by exactly one of them: their own counts add up, and nobody took over or lost one.
    assert sum(job.shards_done() for job in jobs) == SHARDS, [job.stdout for job in jobs]
    assert not [job.stderr for job in jobs if "taking over" in job.stderr or "lost its claim" in job.stderr]
    assert _outputs(out) == reference
    _clean(out)


def test_a_killed_jobs_shard_is_finished_by_another_to_the_same_bytes(shards, reference, tmp_path, tiny_models):
    out = tmp_path / "out"
    jobs = [Job(job_id, shards, out, tiny_models, "--workers", "0", "--claim-timeout", LEASE)
            for job_id in ("A", "B", "C")]
    victim, others = jobs[0], jobs[1:]
    shard = _catch_mid_shard(out, victim, signal.SIGKILL)
    victim.wait()
    for job in others:
        assert job.wait() == 0, job.stderr[-3000:]
    taker = [job for job in others if f"shard {shard}: taking over the claim of" in job.stderr]
    assert len(taker) == 1 and f"pid {victim.pid}, job A" in taker[0].stderr
    assert _outputs(out) == reference  # the killed holder's temporary tar did not survive either
    _clean(out)


def test_a_holder_stopped_past_its_lease_changes_nothing_when_it_wakes(shards, reference, tmp_path, tiny_models):
    out = tmp_path / "out"
    jobs = [Job(job_id, shards, out, tiny_models, "--workers", "0", "--claim-timeout", LEASE)
            for job_id in ("A", "B")]
    sleeper, other = jobs
    shard = _catch_mid_shard(out, sleeper, signal.SIGSTOP)
    try:
        deadline = time.time() + 120
        while not (out / f"{shard}_stats.json").exists() and time.time() < deadline:
            time.sleep(0.1)  # the other job takes the shard over once the sleeper's heartbeat is LEASE old
        assert (out / f"{shard}_stats.json").exists(), "nobody took the stopped holder's shard over"
        # `capfilt stats` meanwhile: the sleeper's own claims went with the shard it lost.
    finally:
        sleeper.process.send_signal(signal.SIGCONT)
    for job in jobs:
        assert job.wait() == 0, job.stderr[-3000:]
    assert f"shard {shard}: taking over the claim of" in other.stderr and f"pid {sleeper.pid}" in other.stderr
    assert f"shard {shard}: this process lost its claim" in sleeper.stderr  # it found out before publishing
    assert _outputs(out) == reference
    _clean(out)


def test_jobs_whose_shards_fail_end_instead_of_waiting_for_each_other(shards, tmp_path, tiny_models):
    """A shard that fails in one job is released at once: another job may try it, and nobody waits forever for
    a shard that is failing elsewhere (each job holding one failed shard and waiting for the other's would)."""
    out = tmp_path / "out"
    failing = [f"pipe:cat {tmp_path / f'gone-{i}.tar'}" for i in range(2)]
    good = [str(p) for p in sorted(shards.glob("*.tar"))[:2]]
    args = ["bootstrap", *failing, *good, "--out", str(out), "--captioner", tiny_models["blip_captioner"],
            "--filter", tiny_models["blip_itm"], "--batch-size", "4", "--workers", "0", "--retries", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "capfilt", *args], env={**env, "CAPFILT_JOB_ID": job_id},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job_id in ("A", "B")]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [r[1][-2000:] for r in results]
    assert all((out / f"{Path(g).stem}_stats.json").exists() for g in good)
    assert not (out / "gone-0_stats.json").exists() and not (out / ".claims" / "shards").exists()


# ----------------------------------------------------------------------------------------------- claims


def _holder_elsewhere(out: Path, name: str, token: str, beat_age_s: float, lease_s: float = 5.0) -> None:
    """A claim on `name` by a process of another machine, whose last heartbeat was `beat_age_s` ago."""
    holder = out / ".claims" / "holders" / token
    holder.parent.mkdir(parents=True, exist_ok=True)
    (out / ".claims" / "shards").mkdir(exist_ok=True)
    holder.write_text(json.dumps({"host": "node-elsewhere", "boot": "x", "pidns": 1, "pid": 4242,
                                  "pid_started": "1", "job": "slurm 77_3", "claim_timeout": lease_s, "token": token}))
    os.link(holder, out / ".claims" / "shards" / name)
    beat = time.time() - beat_age_s
    os.utime(holder, (beat, beat))


def test_a_claim_of_another_machine_is_taken_over_only_once_its_lease_expired(tmp_path):
    """The lease is the only evidence about a process elsewhere: 4 s of silence under a 5 s lease is a slow
    holder, never robbed; 6 s is a dead one, whose claim the next process takes."""
    out = tmp_path / "out"
    out.mkdir()
    _holder_elsewhere(out, "part-00000", "aaaa", beat_age_s=4)
    _holder_elsewhere(out, "part-00001", "bbbb", beat_age_s=6)
    claims = Claims(out, timeout=600).start()
    try:
        assert claims.claim("part-00000") == BUSY and not claims.holds("part-00000")
        assert claims.claim("part-00001") == CLAIMED and claims.holds("part-00001")
        assert claims.claim("part-00001") == MINE
        report = format_report(summarize_claims(out))
        assert "part-00000       node-elsewhere pid 4242, job slurm 77_3, heartbeat 4s ago" in report
        assert "stale claims" not in report
        # A second taker meets a fresh claim (ours), not a stale one: it must not take it.
        assert Claims(out, timeout=600).claim("part-00001") == BUSY
        (out / "part-00002_stats.json").write_text("{}")
        assert claims.claim("part-00002") == DONE
    finally:
        claims.close()
    assert not (out / ".claims" / "shards" / "part-00001").exists()  # released by close
    assert (out / ".claims" / "shards" / "part-00000").exists()  # the live holder elsewhere keeps its claim


def summarize_claims(out: Path):
    """`capfilt stats` on an output whose manifest names two unfinished shards."""
    (out / "capfilt_run.json").write_text(json.dumps({"format": 2, "settings": {},
                                                      "shards": ["part-00000", "part-00001"]}))
    return summarize(out)


def test_stats_shows_shards_in_progress_and_stale_claims(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _holder_elsewhere(out, "part-00000", "aaaa", beat_age_s=1)
    _holder_elsewhere(out, "part-00001", "bbbb", beat_age_s=30)
    report = format_report(summarize_claims(out))
    assert re.search(r"in progress +1\n +part-00000 +node-elsewhere pid 4242, job slurm 77_3, heartbeat 1s ago",
                     report), report
    assert re.search(r"stale claims +1 .*\n +part-00001 +node-elsewhere pid 4242, job slurm 77_3, heartbeat 30s ago",
                     report), report


def test_a_dead_holder_of_this_machine_is_taken_over_at_once(tmp_path):
    """A process of this machine that is gone (killed, OOM) leaves a claim whose lease is still young: the pid
    says it is dead, so a restarted job need not wait out the lease."""
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys; from pathlib import Path; from capfilt.bootstrap.claims import Claims; "
            "c = Claims(Path(sys.argv[1]), 600).start(); assert c.claim('part-00000') == 'claimed'")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True)  # exits holding the claim (no close)
    claims = Claims(out, timeout=600).start()
    try:
        assert claims.claim("part-00000") == CLAIMED
    finally:
        claims.close()


def test_a_finished_output_loses_the_claims_and_temporaries_of_dead_holders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "capfilt_run.json").write_text(json.dumps({"format": 2, "settings": {}, "shards": ["part-00000"]}))
    _holder_elsewhere(out, "part-00000", "aaaa", beat_age_s=60)
    (out / "part-00000.tar.4242-0badcafe.tmp").write_bytes(b"half a tar")
    tidy(out, 600)
    assert (out / ".claims").exists()  # not finished: nothing goes
    (out / "part-00000_stats.json").write_text("{}")
    tidy(out, 600)
    assert sorted(p.name for p in out.iterdir()) == ["capfilt_run.json", "part-00000_stats.json"]
