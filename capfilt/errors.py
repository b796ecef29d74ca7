class CapfiltError(Exception):
    """A user-facing error: bad input, bad options, a missing model. The CLI prints it on one line."""
