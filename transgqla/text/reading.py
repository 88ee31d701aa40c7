"""Text files read in bounded memory: judged on their first bytes, then streamed in pieces.

Why: ``--calib`` and ``verify --text`` take any path a user types. Reading a 2 GB file whole and handing it to
the tokenizer costs gigabytes (6.4 GB for 50 MB of text) or aborts inside the tokenizers library; ``/dev/zero``
never ends; a program binary or ``model.safetensors`` is not text, and calibrating on it silently ruins a
conversion. So:

* **regular files only** (:func:`check_text_file`): a FIFO, device or folder is refused before it is opened;
* **text only**, judged on the first :data:`SNIFF_BYTES`: a NUL byte, invalid UTF-8 or mostly control
  characters is refused in one line before any work (beyond that prefix, undecodable bytes become U+FFFD);
* **streamed** (:func:`file_pieces`, :func:`chunks`): plain text in pieces of :data:`CHUNK_CHARS` characters
  cut after a newline where there is one, a ``.jsonl`` line by line (each at most :data:`MAX_LINE_CHARS`).
  The caller tokenizes chunk by chunk and stops at its token budget, so memory is flat in the file's size.
  A text shorter than one chunk is tokenized whole, exactly as before.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import InputError

SNIFF_BYTES = 64 << 10
CHUNK_CHARS = 1 << 20  # tokenized at a time: ~100 MB of tokenizer memory at most
MAX_LINE_CHARS = 64 << 20  # one .jsonl record
MAX_CONTROL_SHARE = 0.01  # control characters (other than whitespace) allowed in the sniffed prefix
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_WHITESPACE_CONTROLS = set("\t\n\r\f\v")


def _sniff_problem(head: bytes) -> str | None:
    """Why ``head`` (a file's first bytes) is not text, or None."""
    nul = head.find(b"\0")
    if nul >= 0:
        return f"it holds a NUL byte at offset {nul} (a binary file?)"
    for cut in range(4):  # the prefix may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError as exc:
            if cut == 3 or exc.start < len(head) - 4:
                return f"it is not UTF-8 (byte {exc.start} cannot be decoded)"
    controls = sum(1 for ch in text if (ord(ch) < 32 or ord(ch) == 127) and ch not in _WHITESPACE_CONTROLS)
    if text and controls > MAX_CONTROL_SHARE * len(text):
        return f"{controls} of its first {len(text)} characters are control characters"
    return None


def check_text_file(path: Path | str, flag: str) -> Path:
    """``path`` if it is a regular, non-empty UTF-8 text file (judged on its first bytes); one-line InputError
    naming ``flag`` otherwise. Opens nothing but a regular file."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{flag} {path} does not exist") from None
    except OSError as exc:
        raise InputError(f"{flag} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise InputError(f"{flag} {path} is {kind}; pass a text file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise InputError(f"{flag} {path} cannot be read: {exc.strerror or exc}") from None
    if not head.strip():
        raise InputError(f"{flag} {path} is empty")
    why = _sniff_problem(head)
    if why:
        raise InputError(f"{flag} {path} is not text: {why}; pass a UTF-8 text file")
    return path


def _plain_pieces(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        while piece := fh.read(CHUNK_CHARS):
            yield piece


def _jsonl_texts(path: Path, flag: str) -> Iterator[str]:
    """Each record's ``text``, line by line."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        n = 0
        while line := fh.readline(MAX_LINE_CHARS + 1):
            n += 1
            if len(line) > MAX_LINE_CHARS:
                raise InputError(f"{flag} {path}:{n}: a line longer than {MAX_LINE_CHARS >> 20} MiB characters")
            if not line.strip():
                continue
            try:
                yield str(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{n}: expected a JSON object with a 'text' field") from None


def file_parts(path: Path, flag: str) -> Iterator[Iterator[str]]:
    """The parts of a text file, each an iterator of pieces: the whole file (plain text) or one per record."""
    path = check_text_file(path, flag)
    if path.suffix in JSONL_SUFFIXES:
        for text in _jsonl_texts(path, flag):
            yield iter((text,))
    else:
        yield _plain_pieces(path)


def joined(parts: Iterable[Iterable[str]], sep: str = "\n\n") -> Iterator[str]:
    """The pieces of the non-blank parts joined by ``sep``: ``sep.join(p for p in parts if p.strip())``,
    streamed (a part's leading blank pieces are held until it proves non-blank)."""
    first = True
    for part in parts:
        held: list[str] = []
        started = False
        for piece in part:
            if not started:
                held.append(piece)
                if not piece.strip():
                    continue
                started = True
                if not first:
                    yield sep
                first = False
                yield from held
                held = []
                continue
            yield piece


def chunks(pieces: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """The concatenation of ``pieces`` cut into chunks of about ``size`` characters, each cut just after a
    newline when the chunk holds one past its middle (so words are not split); the whole text when shorter."""
    buf: list[str] = []
    n = 0
    for piece in pieces:
        buf.append(piece)
        n += len(piece)
        if n <= size:
            continue
        text = "".join(buf)
        while len(text) > size:
            cut = text.rfind("\n", size // 2, size) + 1 or size
            yield text[:cut]
            text = text[cut:]
        buf, n = [text], len(text)
    if n:
        yield "".join(buf)
