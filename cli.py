"""`python cli.py ...` from a checkout, the same as the installed `capfilt` command: the CLI lives in
`capfilt/cli.py`, so that an install adds only the `capfilt` package to site-packages (ARCHITECTURE.md)."""

from capfilt.cli import main

if __name__ == "__main__":
    main()
