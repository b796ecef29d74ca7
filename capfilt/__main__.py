"""`python -m capfilt ...`, the same as the `capfilt` command (`torchrun -m capfilt bootstrap ...` on a cluster)."""

from capfilt.cli import main

main()
