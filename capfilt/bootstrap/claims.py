"""Which shard next, for every process of every job writing one `--out`: shard claims with leases.

A process claims input shard NAME by making `OUT/.claims/shards/NAME` a hard link of its holder file
`OUT/.claims/holders/TOKEN`, which says who holds it (host, pid, job, lease); TOKEN is drawn per process and
run. A link appears whole or not at all and fails when the name exists, also over NFS, so exactly one process
wins (where the filesystem has no hard links, the claim is created with O_EXCL and the holder's fields written
into it). Nobody talks to anybody: any number of processes, from any launcher and any number of jobs, share the
shards of one output, and fast ones take more.

The holder file's mtime is the heartbeat, renewed by a thread every quarter of the lease (`--claim-timeout`): one
touch renews all of a process's claims. A claim is stale when its holder's heartbeat is older than the holder's
own lease, when its holder file is gone, or when its holder is a process of this same machine that has ended.
The next process to reach a stale claim moves it aside under a name of its own (a rename: one taker wins),
checks that what it moved is that same stale claim (else puts it back), and claims the shard anew. A holder
that was only paused, and wakes after losing its claim, finds out before it publishes anything (`holds`),
discards its work and moves on, never touching its successor's files.

A shard is done when its stats file exists (written last). A process reads the shards nobody holds, then waits
for those that others hold until they are done or their claims go stale, so that a job ends only when every
shard is done or has failed in it (each process tries a shard once per run; a failed one is released at once,
so that nobody waits for it). A restarted job therefore redoes exactly the shards without a stats file: at
once where their holders died on this machine, after their lease where they died elsewhere.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from capfilt.data.files import TMP_SUFFIX
from capfilt.data.reader import shard_name
from capfilt.data.schema import CLAIMS, MANIFEST, is_shard_temporary, shard_of, stats_path
from capfilt.data.writer import recorded_shards
from capfilt.launcher import job_label

logger = logging.getLogger(__name__)

SHARDS, HOLDERS = "shards", "holders"  # the two directories under OUT/.claims
CLAIMED, DONE, MINE, BUSY = "claimed", "done", "mine", "busy"  # what `Claims.claim` found
_ASIDE = ".stale"  # suffix of a stale claim moved aside by its taker (a dot name: never a shard's claim)
# link(2) errors of a filesystem without hard links (FUSE mounts of object stores, some SMB shares)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


def _text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _machine() -> dict[str, Any]:
    """What tells this machine's processes from any other's: host name, boot, pid namespace (a container)."""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot": _text("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def _started(pid: Any) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), so a reused pid is not taken for the holder;
    None when there is no such process, or only its zombie."""
    stat = _text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether `holder` was a process of this very machine that has ended. Anywhere else (another node, another
    container), or where /proc cannot say, only its lease can tell."""
    here = _machine()
    if here["boot"] is None or here["pidns"] is None or holder.get("pid_started") is None:
        return False
    return all(holder.get(k) == v for k, v in here.items()) and _started(holder.get("pid")) != holder["pid_started"]


def _heartbeat_age(root: Path, holder: dict[str, Any]) -> float | None:
    """Seconds since `holder` last renewed its claims; None when its holder file is gone."""
    if not holder.get("token"):
        return None
    try:
        return time.time() - (root / HOLDERS / holder["token"]).stat().st_mtime
    except FileNotFoundError:
        return None


def _stale(root: Path, path: Path, holder: dict[str, Any], timeout: float) -> bool:
    """Whether the claim at `path`, held by `holder`, may be taken over. `timeout`: for a claim without holder
    fields (an O_EXCL claim being written, or a broken one), whose own age decides."""
    if not holder.get("token"):
        try:
            return time.time() - path.stat().st_mtime > timeout
        except FileNotFoundError:
            return False
    if _dead_here(holder):
        return True
    age = _heartbeat_age(root, holder)
    # No holder file: its process ended (or slept through a tidy-up), and nobody renews this claim.
    return age is None or age > float(holder.get("claim_timeout", timeout))


def _read_claim(path: Path) -> dict[str, Any]:
    """The holder fields in a claim; {} while an O_EXCL claim is still being written. FileNotFoundError: gone."""
    try:
        fields = json.loads(path.read_text())
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) else {}


def _create(source: Path, claim: Path) -> None:
    """`claim` as a hard link of `source`, or a new file with its bytes where the filesystem has no links;
    FileExistsError when the name is taken."""
    try:
        os.link(source, claim)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        data = source.read_bytes()
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def describe(holder: dict[str, Any]) -> str:
    """A holder as people name it: host, pid and job."""
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')}{job}"


class Claims:
    """`claims(urls)` yields the URLs this process (or DataLoader worker) is to read, each claimed when it gets
    to it; `holds(name)` before publishing, `release(name)` once done, `close()` at the end. `start()` writes
    the holder file and starts the heartbeat in this process; copies (pickled into workers) claim under it."""

    def __init__(self, out: Path, timeout: float):
        self.out, self.timeout = Path(out), float(timeout)
        self.root = self.out / CLAIMS
        self.token = secrets.token_hex(8)
        self.holder_file = self.root / HOLDERS / self.token
        self.identity = {**_machine(), "pid": os.getpid(), "pid_started": _started(os.getpid()),
                         "job": job_label(), "claim_timeout": self.timeout, "token": self.token}
        self._beat: threading.Thread | None = None
        self._stop: threading.Event | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_beat": None, "_stop": None}  # the heartbeat stays with the process it beats for

    @property
    def poll_s(self) -> float:
        """How often a process waiting for others' shards looks again."""
        return min(10.0, max(0.2, self.timeout / 10))

    # ------------------------------------------------------------------------------------------- the holder

    def start(self) -> Claims:
        self._write_holder()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="capfilt-claims", daemon=True)
        self._beat.start()
        return self

    def _write_holder(self) -> None:
        self.holder_file.parent.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        tmp = self.holder_file.with_name(f".{self.token}{TMP_SUFFIX}")
        tmp.write_text(json.dumps(self.identity))
        os.replace(tmp, self.holder_file)  # whole or absent: no reader sees half a holder

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                os.utime(self.holder_file)
            except FileNotFoundError:  # a peer that found every shard done tidied it away, or we slept past our lease
                try:
                    self._write_holder()
                except OSError as exc:
                    logger.warning("cannot renew this process's shard claims (%s): %s", self.holder_file, exc)
            except OSError as exc:
                logger.warning("cannot renew this process's shard claims (%s): %s", self.holder_file, exc)

    # ------------------------------------------------------------------------------------------- claiming

    def __call__(self, urls: Iterable[str]) -> Iterator[str]:
        pending, told = list(urls), False
        while pending:
            waiting = []
            for url in pending:
                state = self.claim(shard_name(url))
                if state == CLAIMED:
                    yield url
                elif state == BUSY:
                    waiting.append(url)
            pending = waiting
            if pending:
                if not told:
                    logger.info("waiting for %d shard(s) that other processes hold: they are taken over if their "
                                "holder stops renewing its claim for its --claim-timeout", len(pending))
                    told = True
                time.sleep(self.poll_s)

    def claim(self, name: str) -> str:
        """CLAIMED: this process holds shard `name` now and is to do it; DONE: it has its stats file; MINE: this
        process holds it already (another of its workers); BUSY: another live process holds it."""
        if stats_path(self.out, name).exists():
            return DONE
        path, took = self.root / SHARDS / name, None
        for _ in range(10):  # each turn lost a race with a releasing holder or a taker; a few settle it
            try:
                _create(self.holder_file, path)
            except FileExistsError:
                try:
                    holder = _read_claim(path)
                except FileNotFoundError:  # released meanwhile
                    continue
                if holder.get("token") == self.token:
                    return MINE
                if not self.stale(path, holder) or not self._take_aside(path, holder):
                    return BUSY
                took = holder
                continue
            except FileNotFoundError:  # a peer that found every shard done tidied .claims away: set it up again
                self._write_holder()
                continue
            if took is not None:
                logger.warning("shard %s: taking over the claim of %s, whose heartbeat stopped", name, describe(took))
                self._remove_temporaries(name)
            if stats_path(self.out, name).exists():  # finished by its holder after our first look
                self.release(name)
                return DONE
            return CLAIMED
        return BUSY

    def stale(self, path: Path, holder: dict[str, Any]) -> bool:
        return _stale(self.root, path, holder, self.timeout)

    def _take_aside(self, path: Path, holder: dict[str, Any]) -> bool:
        """Move the stale claim at `path` out of the way; False when what moved was not that stale claim (a peer
        took it over first, or its holder came back), which is then put back."""
        aside = path.with_name(f".{path.name}.{self.token}{_ASIDE}")
        try:
            # Look again right before the rename: a peer that took the shard over since our first look holds a
            # fresh claim, and moving it aside, even for a moment, could let a third process claim the shard and
            # cost the live holder its work. (Only a takeover in the instant between this look and the rename
            # still can; the holder then finds out before it publishes, so it costs work, never output.)
            if _read_claim(path).get("token") != holder.get("token"):
                return False
            os.rename(path, aside)
        except FileNotFoundError:  # gone already: free to claim
            return True
        moved = _read_claim(aside)
        if moved.get("token") == holder.get("token") and self.stale(aside, moved):
            aside.unlink(missing_ok=True)
            return True
        try:
            _create(aside, path)
        except FileExistsError:  # claimed anew meanwhile: that one stands
            pass
        aside.unlink(missing_ok=True)
        return False

    def _remove_temporaries(self, name: str) -> None:
        """The temporary files a shard's robbed holders left: that holder is dead, or is to discard its work."""
        for entry in os.scandir(self.out):
            if is_shard_temporary(entry.name, name):
                Path(entry.path).unlink(missing_ok=True)

    def holds(self, name: str) -> bool:
        """Whether this process still holds shard `name`: asked right before each file of it is published."""
        try:
            return _read_claim(self.root / SHARDS / name).get("token") == self.token
        except OSError:
            return False

    def release(self, name: str) -> None:
        """After the shard's stats file is written; a claim this process no longer holds is left alone."""
        if self.holds(name):
            (self.root / SHARDS / name).unlink(missing_ok=True)

    def close(self) -> None:
        """The end of this process's run: its remaining claims (shards it was interrupted in) and its holder file
        go, so another process or a later run may do those shards at once."""
        if self._stop is not None:
            self._stop.set()
            self._beat.join()
        try:
            names = os.listdir(self.root / SHARDS)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.startswith(".") and self.holds(name):
                (self.root / SHARDS / name).unlink(missing_ok=True)
        self.holder_file.unlink(missing_ok=True)
        _remove_empty(self.root)


# ----------------------------------------------------------------------------------------------- the output


def tidy(out: Path, timeout: float) -> None:
    """Once every shard the output's runs took on is done, what dead or robbed processes left goes: their claims
    and holder files, claims of earlier capfilt versions, and temporary files of those shards. A live holder's
    file stays (it removes its own); `.claims` goes with the last of them."""
    shards = recorded_shards(out)
    if shards is None or not all(stats_path(out, shard).exists() for shard in shards):
        return
    done, root = set(shards), out / CLAIMS
    if root.is_dir():
        for entry in os.scandir(root):
            if entry.name not in (SHARDS, HOLDERS):  # a claim directory of an earlier version (one per attempt)
                shutil.rmtree(entry.path, ignore_errors=True)
        for name in _listing(root / SHARDS):
            shard = name[1:-len(_ASIDE)].rsplit(".", 1)[0] if name.endswith(_ASIDE) else name
            if shard in done:
                (root / SHARDS / name).unlink(missing_ok=True)
        for token in _listing(root / HOLDERS):
            path = root / HOLDERS / token
            try:
                holder = _read_claim(path)
            except OSError:
                continue
            if holder.get("token") == token and _stale(root, path, holder, timeout):
                path.unlink(missing_ok=True)
        _remove_empty(root)
    for entry in os.scandir(out):
        if entry.name.endswith(TMP_SUFFIX) and (shard_of(entry.name) in done or entry.name.startswith(MANIFEST + ".")):
            Path(entry.path).unlink(missing_ok=True)


def _remove_empty(root: Path) -> None:
    """`.claims` and its two directories, where empty: the last process of a job to leave takes them along."""
    for directory in (root / SHARDS, root / HOLDERS, root):
        try:
            directory.rmdir()
        except FileNotFoundError:  # a peer leaving at the same time was first
            continue
        except OSError:  # not empty: someone still holds something
            return


def _listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


@dataclass
class ClaimView:
    """A claim as `capfilt stats` shows it."""

    shard: str
    holder: str  # host, pid, job
    heartbeat_age_s: float | None  # since its holder last renewed it; None: its holder file is gone
    stale: bool  # the next process to reach it takes it over


def survey(out: Path, timeout: float) -> list[ClaimView]:
    """The claims on `out` now: shards in progress, and stale claims. `timeout`: for claims that carry none."""
    root, views = out / CLAIMS, []
    for name in sorted(_listing(root / SHARDS)):
        if name.startswith("."):
            continue
        try:
            holder = _read_claim(root / SHARDS / name)
        except OSError:
            continue
        views.append(ClaimView(name, describe(holder), _heartbeat_age(root, holder) if holder else None,
                               _stale(root, root / SHARDS / name, holder, timeout)))
    return views
