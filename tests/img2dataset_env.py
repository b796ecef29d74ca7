"""img2dataset in a virtual environment of its own: it pins webdataset<0.3 and pandas<3, which capfilt's cannot hold.

`.ci/run` builds it before the tests (`python3 tests/img2dataset_env.py`); the integration test builds it itself
when it is missing, and skips, saying why, only when it cannot be built (no package index reachable).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REQUIREMENT = "img2dataset==1.47.0"  # the release the round trip was checked with
VENV = Path(os.environ.get("CAPFILT_IMG2DATASET_VENV", Path(__file__).resolve().parents[1] / ".venv-img2dataset"))
_DONE = ".capfilt-complete"  # written last: a venv whose install was cut short is rebuilt, not trusted


def executable(venv: Path = VENV) -> Path:
    return venv / "bin" / "img2dataset"


def build(venv: Path = VENV) -> Path:
    """The img2dataset executable, building its venv first if needed. Raises CalledProcessError on failure."""
    done = venv / _DONE
    if done.exists() and done.read_text().strip() == REQUIREMENT:
        return executable(venv)
    python = os.environ.get("CAPFILT_IMG2DATASET_PYTHON", sys.executable)
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", REQUIREMENT],
                   check=True)
    (venv / _DONE).write_text(REQUIREMENT + "\n")
    return executable(venv)


if __name__ == "__main__":
    print(build())
