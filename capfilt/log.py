"""capfilt's one logger set-up: messages on stderr, above any progress bar, with the process's rank in front
under a launcher (`[rank 3/8]`), so the lines of many processes can be told apart."""

from __future__ import annotations

import logging
import sys

from capfilt.launcher import current_rank


class _AboveBars(logging.StreamHandler):
    """Writes through tqdm, which redraws its bars below the message instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure(level: int = logging.INFO) -> None:
    """Route the `capfilt` loggers to stderr: called by the entry point (the CLI, a spawned
    `--processes` child), never on import, so a program using capfilt as a library keeps its own logging."""
    me = current_rank()
    prefix = f"[rank {me.rank}/{me.world_size}] " if me.world_size > 1 else ""
    handler = _AboveBars()
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    logger = logging.getLogger("capfilt")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
