"""Caption rules: pure text checks that a caption must pass before it is scored (no model, no I/O).

A weak captioner writes text that a similarity filter calibrated on human captions has never seen: one word, a
file name, an id, an HTML fragment, a phrase looping, a sentence cut off where generation hit its length limit.
Such a caption can score well (issue 23's demo kept `a 2019-3-7.png` and `the city`), so it is dropped before
scoring. Data-Juicer's text filters (words_num, alphanumeric, word_repetition) are the reference point, sized
here for one-line captions rather than documents; the markup and unfinished-sentence checks are capfilt's own.

`caption_rule` returns the reason code (capfilt.data.schema.CAPTION_RULES) of the first rule a caption fails,
in the order too_few_words, too_little_text, markup_or_code, repeated_ngrams, unfinished_sentence.
"""

from __future__ import annotations

import re
from collections import Counter

from capfilt.data.schema import (
    MARKUP_OR_CODE,
    REPEATED_NGRAMS,
    TOO_FEW_WORDS,
    TOO_LITTLE_TEXT,
    UNFINISHED_SENTENCE,
)
from capfilt.settings import CaptionRulesConfig

# What a caption that shows markup or code contains; each pattern names what it stands for. Bare domains
# (`shutterstock.com`) are left to the filter: alt-text names sites and shops, and dropping it is not this
# rule's call.
_MARKUP = {
    "html tag": re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>"),
    "html entity": re.compile(r"&(#\d{1,7}|#x[0-9A-Fa-f]{1,6}|[A-Za-z]{2,8});"),
    "url": re.compile(r"\b(https?|ftp)://|\bwww\.[\w-]+\.", re.IGNORECASE),
    "file name": re.compile(r"\S\.(jpe?g|png|gif|webp|bmp|tiff?|svg|heic|pdf|mp4|mov|avi|docx?|html?|php|aspx?)\b",
                            re.IGNORECASE),
    "camera file stem": re.compile(r"\b(IMG|DSC|DSCN|DSCF|PXL|VID|MVI)[_-]?\d{3,}", re.IGNORECASE),
    "hex number": re.compile(r"\b0x[0-9A-Fa-f]+"),
    # A run of 8+ hex digits mixing digits and letters: hashes, UUID parts (`5329b7fe`); not words, not years.
    "hex id": re.compile(r"\b(?=[0-9A-Fa-f]*[0-9])(?=[0-9A-Fa-f]*[A-Fa-f])[0-9A-Fa-f]{8,}\b"),
    # `a_b_c` as one letter-underscore-letter anchor: `\w+_\w+_\w+` backtracks quadratically on a long word (a
    # 64 KiB caption took 8 s) and the rules run in the main process.
    "code": re.compile(r"[{}\\]|\w\(\)|[^\W_]_[^\W_]+_[^\W_]|[=!<>]=|=>|::"),
}

# Words no English caption ends on: articles, the prepositions and conjunctions that need what follows,
# auxiliaries. Particles that do end captions (`on`, `in`, `up`, `off`, `out`, `over`, `by`) are not here:
# "a room with the lights on" is finished.
_DANGLING = frozenset(
    "a an the of with and or but nor to from for at into onto than as is are was were be been has have had "
    "its their your my our whose very such".split()
)
# Abbreviations after which a full stop does not end a sentence ("Dr. Smith", "St. Louis").
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr mt ft vs no co inc ltd prof rev gen col lt sgt ave".split())
_WORD = re.compile(r"[^\W_]", re.UNICODE)  # a letter or digit
_EDGE_PUNCTUATION = "\"'()[]{}<>.,;:!?*-–—…"


def words(text: str) -> list[str]:
    """The whitespace-separated tokens that hold a letter or digit (a lone `-` or `&` is no word)."""
    return [w for w in text.split() if _WORD.search(w)]


def alpha_share(text: str) -> float:
    """Letters among the non-space characters (1.0 for an empty text: nothing to judge)."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 1.0


def markup(text: str) -> str | None:
    """What marks `text` as markup or code (`html tag`, `file name`, `hex id`...), None when nothing does."""
    return next((name for name, pattern in _MARKUP.items() if pattern.search(text)), None)


def repeated_share(text: str, n: int) -> float:
    """The share of the word n-grams that occur more than once (Data-Juicer's word repetition ratio): 0.0 for a
    caption of fewer than n + 1 words."""
    tokens = [w.strip(_EDGE_PUNCTUATION).lower() for w in words(text)]
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return sum(c for c in grams.values() if c > 1) / total if total > 1 else 0.0


def unfinished(text: str, synthetic: bool) -> bool:
    """A sentence cut off, as a caption that hit the captioner's length limit ends: on a word no sentence ends on
    ("a man sitting on a bench with a"); or, for a synthetic caption, a new sentence begun after a finished one
    and cut ("... so to speak. I am the person"). Web alt-text often adds a credit without a full stop ("Sunset
    over the lake. Photo by J. Smith"), so the second check is for generated text only."""
    tokens = words(text)
    if not tokens:
        return False
    if tokens[-1].strip(_EDGE_PUNCTUATION).lower() in _DANGLING:
        return True
    if not synthetic or text.rstrip().endswith((".", "!", "?", '"', "'", ")", "…")):
        return False
    return any(_ends_sentence(w) for w in tokens[:-1])


def _ends_sentence(word: str) -> bool:
    """A token that ends a sentence: a word of two letters or more, not an abbreviation, then `.`, `!` or `?`."""
    if not word.endswith((".", "!", "?")):
        return False
    stem = word.rstrip(".!?")
    return len(stem) >= 2 and stem.isalpha() and stem.lower() not in _ABBREVIATIONS


def caption_rule(text: str, config: CaptionRulesConfig, synthetic: bool = False) -> str | None:
    """The reason code of the first rule `text` fails; None when it passes them all or the rules are off.
    `synthetic`: a captioner wrote it (see `unfinished`)."""
    if not config.enabled:
        return None
    if len(words(text)) < config.min_words:
        return TOO_FEW_WORDS
    if alpha_share(text) < config.min_alpha:
        return TOO_LITTLE_TEXT
    if markup(text) is not None:
        return MARKUP_OR_CODE
    if repeated_share(text, config.ngram) > config.max_repeated:
        return REPEATED_NGRAMS
    if unfinished(text, synthetic):
        return UNFINISHED_SENTENCE
    return None
