"""The built-in documentation texts (``builtin:calib``, ``builtin:eval``): offline English prose for
calibration and held-out evaluation.

Nothing is downloaded: the text is read, at run time, from the Python standard
library that runs transgqla, so it exists on any fresh machine.

Sources, in this order:

1. ``pydoc_data/topics.py`` -- the plain-text rendering of the Python Language
   Reference that ``help()`` shows (every CPython ships it; Debian's
   ``libpython3.X-stdlib`` too). About 300 KB of prose once code samples,
   grammar rules, headings and duplicated sections are dropped.
2. Docstrings of the public pure-Python standard library modules (``argparse``,
   ``asyncio``, ``email``, ...), read with :mod:`ast` (nothing is imported),
   added module by module until both texts reach :data:`TARGET_CHARS`.

Both are the CPython documentation, under the PSF License; we only read the
copy that is already installed and never redistribute it.

The unit of text is a *document* (one help topic, or one module's docstrings).
Documents are taken in a fixed order (topic keys sorted, then module paths
sorted) and each goes, whole, to whichever of ``"calib"`` / ``"eval"`` is
shorter so far; a paragraph that already appeared anywhere earlier is dropped.
The two texts therefore share no document and no paragraph.

Only prose paragraphs are kept: markup is stripped (``*emphasis*``, footnote
marks, heading underlines), each paragraph is joined into one line with
whitespace collapsed, and paragraphs are separated by a blank line.

The result is deterministic for a given Python version; a different CPython
version ships different documentation and so gives (slightly) different text.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from pathlib import Path

from transgqla.errors import InputError
from transgqla.text.builtin import DOC_NAMES, TARGET_CHARS, split_documents

__all__ = ["TEXT_NAMES", "documentation_text"]

TEXT_NAMES = DOC_NAMES  # standard-library docstrings stop being added once both hold TARGET_CHARS characters

# Folders of the standard library whose docstrings are not wanted (tests, tools,
# code generators, vendored or platform packages).
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "tkinter",
        "ensurepip",
        "distutils",
        "pydoc_data",
        "encodings",
        "venv",
    }
)

_UNDERLINE = re.compile(r"^\s*([*=\-~^\"'`#+])\1{2,}\s*$")
_CODE_LINE = re.compile(
    r">>>|::=|^\s*\.\.\.|[{};]\s*$|\s\$\s|%\(|"
    r"^\s*(def|class|import|from|return|for|if|elif|while|with|try|except|print|raise)\b.*[:(]"
)
_ENDS_LIKE_PROSE = re.compile(r"[.!?:)\"\u201d]\s*$")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
_EMPHASIS = re.compile(r"\*(\S(?:[^*\n]*\S)?)\*")
_SPACES = re.compile(r"\s+")


def _raw_paragraphs(doc: str) -> list[list[str]]:
    """Blank-line separated blocks of lines; a heading (a line underlined with
    ``***``/``===``/``---``) is dropped together with its underline."""
    paras: list[list[str]] = []
    cur: list[str] = []
    for line in doc.splitlines():
        if _UNDERLINE.match(line):
            if cur:
                cur.pop()  # the heading text above the underline
            continue
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def _clean_paragraph(lines: list[str]) -> str | None:
    """One line of clean prose, or None when the block is code, grammar, a
    heading, a signature, a table or too short to be a sentence."""
    if any(_CODE_LINE.search(line) for line in lines):
        return None
    text = " ".join(line.strip() for line in lines)
    if len(text.split()) < 8:
        return None
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters < 0.8 * len(text):
        return None
    if not _ENDS_LIKE_PROSE.search(text):
        return None
    text = _FOOTNOTE.sub("", text)
    text = _EMPHASIS.sub(r"\1", text)
    return _SPACES.sub(" ", text).strip()


def _prose(doc: str) -> list[str]:
    out = []
    for block in _raw_paragraphs(doc):
        para = _clean_paragraph(block)
        if para is not None:
            out.append(para)
    return out


def _topic_documents():
    """(name, raw text) of each help topic, by sorted key."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python without pydoc_data
        return
    for key in sorted(topics):
        yield f"topics:{key}", topics[key]


def _stdlib_module_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(("_", ".", "test", "config-"))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(("_", "test")):
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files


def _docstring_document(path: Path) -> str:
    """All docstrings of one module (module, classes, functions), in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return "\n\n".join(docs)


def _documentation():
    """(name, prose paragraphs) of the help topics, then of the standard library's docstrings."""
    for name, doc in _topic_documents():
        yield name, _prose(doc)
    for path in _stdlib_module_files():
        yield str(path), _prose(_docstring_document(path))


@functools.lru_cache(maxsize=1)
def _split() -> dict[str, str]:
    return split_documents(_documentation(), TEXT_NAMES, TARGET_CHARS)


def documentation_text(name: str) -> str:
    """``calib`` or ``eval``: disjoint halves of the documentation (see the module docstring), each about
    :data:`~transgqla.text.builtin.TARGET_CHARS` characters (roughly 60-70k tokens for a Llama-style BPE
    tokenizer), deterministic for a given Python version."""
    if name not in TEXT_NAMES:
        raise InputError(f"unknown documentation text {name!r}; choose one of: {', '.join(TEXT_NAMES)}")
    text = _split()[name]
    if not text.strip():
        raise InputError(
            "this Python ships no documentation to build the built-in texts from "
            "(pydoc_data and the standard library sources are missing); pass a text file instead"
        )
    return text
