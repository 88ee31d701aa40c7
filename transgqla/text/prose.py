"""A second offline text domain: general English prose (quotations, anecdotes, verse).

Why: the built-in texts of :mod:`transgqla.text.docs` are CPython documentation, one narrow domain. A
conversion calibrated on it must also be judged on text it was not calibrated on, and a calibration
that generalizes needs more than one domain. Nothing may be downloaded at run time, so the text is
read from Debian's ``fortunes`` and ``fortunes-min`` packages (the BSD ``fortune`` collections,
``apt-get install fortunes``, DFSG-free, in Debian main), installed under
:data:`FORTUNE_DIR`: about 2.5 MB of English from thousands of authors, from Shakespeare and Twain to
anonymous jokes and proverbs.

The unit of text is one fortune (the ``%``-separated entries of each file). Files about computers,
Linux, Perl, Debian and IRC logs, and ASCII art, are left out (:data:`SKIPPED_FILES`) so the domain
stays far from technical documentation. Whitespace is normalized (leading tabs and runs of spaces
collapse; line breaks inside a fortune stay, they carry verse and dialogue) and duplicates are dropped.
Fortunes are taken in a fixed order that mixes all files (sorted by the SHA-1 of their text, so a
side's first 300 KB draws on every file, not on the alphabetically first ones) and split, whole, between
``prose-calib`` and ``prose-eval`` by :func:`transgqla.text.builtin.split_documents`, exactly as the
documentation texts are: the two share no fortune.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

from transgqla.errors import InputError
from transgqla.text.builtin import PROSE_NAMES, TARGET_CHARS, split_documents

__all__ = ["FORTUNE_DIR", "PROSE_NAMES", "fortune_documents", "prose_text"]

FORTUNE_DIR = Path("/usr/share/games/fortunes")
FORTUNE_DIR_ENV = "TRANSGQLA_FORTUNE_DIR"  # another folder of fortune files (tests, non-Debian systems)
SKIPPED_FILES = frozenset(
    {"computers", "linux", "linuxcookie", "perl", "debian", "ascii-art", "knghtbrd", "translate-me", "disclaimer"}
)
_SPACES = re.compile(r"[ \t]+")
_MIN_WORDS = 4


def _clean(entry: str) -> str | None:
    lines = [_SPACES.sub(" ", line).strip() for line in entry.splitlines()]
    text = "\n".join(line for line in lines if line)
    if len(text.split()) < _MIN_WORDS:
        return None
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return text if letters >= 0.8 * len(text) else None  # drops tables and pictures made of symbols


def fortune_documents(folder: Path) -> list[str]:
    """Clean fortunes of every fortune file in ``folder`` (``.dat`` indexes, ``.u8`` links and
    :data:`SKIPPED_FILES` skipped), duplicates dropped, ordered by the SHA-1 of their text."""
    docs, seen = [], set()
    for path in sorted(folder.iterdir()):
        if path.name in SKIPPED_FILES or path.suffix or not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            text = _clean(entry)
            if text is not None and text not in seen:
                seen.add(text)
                docs.append(text)
    return sorted(docs, key=lambda d: hashlib.sha1(d.encode()).digest())


def fortune_folder() -> Path:
    return Path(os.environ.get(FORTUNE_DIR_ENV) or FORTUNE_DIR)


@functools.lru_cache(maxsize=4)
def _split(folder: Path) -> dict[str, str]:
    if not folder.is_dir():
        raise InputError(
            f"the prose texts are read from Debian's fortune files in {folder}, which is missing: "
            f"apt-get install fortunes (or set {FORTUNE_DIR_ENV} to a folder of fortune files)"
        )
    docs = fortune_documents(folder)
    if not docs:
        raise InputError(f"no fortunes found in {folder}")
    return split_documents(((f"fortune:{i}", [d]) for i, d in enumerate(docs)), PROSE_NAMES, TARGET_CHARS)


def prose_text(name: str) -> str:
    """``prose-calib`` or ``prose-eval``: disjoint halves of the fortunes, each at most about
    :data:`transgqla.text.builtin.TARGET_CHARS` characters (all there is when the collection is smaller)."""
    if name not in PROSE_NAMES:
        raise InputError(f"unknown prose text {name!r}; choose one of: {', '.join(PROSE_NAMES)}")
    return _split(fortune_folder())[name]
