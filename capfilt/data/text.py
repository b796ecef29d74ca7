"""Caption text cleaning, as BLIP's `pre_caption` does it before ITM scoring and training."""

import re

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s+")


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lowercase, drop `.!"()*#:;~`, collapse whitespace, keep the first `max_words` words."""
    text = _SPACES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).strip()
    return " ".join(text.split(" ")[:max_words])
