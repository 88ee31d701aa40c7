"""The built-in offline texts by name (``builtin:NAME`` wherever a text source is taken), and the rule that
splits a collection into two disjoint halves.

Two domains, two halves each: ``calib`` / ``eval`` (CPython's own documentation, :mod:`.docs`) and
``prose-calib`` / ``prose-eval`` (general English from Debian's fortunes, :mod:`.prose`). Nothing is
downloaded: both are read from what the machine already has. The halves of a domain share no document
and no paragraph (:func:`split_documents`), so a model calibrated on one half is judged on text it never saw.
"""

from __future__ import annotations

from transgqla.errors import InputError

#: Characters each half aims for (a domain smaller than twice this gives all it has).
TARGET_CHARS = 300_000
DOC_NAMES = ("calib", "eval")
PROSE_NAMES = ("prose-calib", "prose-eval")
NAMES = DOC_NAMES + PROSE_NAMES


def split_documents(documents, names: tuple[str, ...], target: int | None) -> dict[str, str]:
    """Deal ``(name, paragraphs)`` documents, in order, whole, to whichever side of ``names`` is
    shortest so far; a paragraph seen before is dropped. Stops once every side has ``target``
    characters (None: never). Returns each side's paragraphs joined by blank lines."""
    sides: dict[str, list[str]] = {name: [] for name in names}
    sizes = {name: 0 for name in names}
    seen: set[str] = set()
    for _name, doc in documents:
        if target is not None and min(sizes.values()) >= target:
            break
        paras = []
        for para in doc:
            if para not in seen:
                seen.add(para)
                paras.append(para)
        if not paras:
            continue
        side = min(names, key=lambda n: (sizes[n], names.index(n)))
        sides[side].extend(paras)
        sizes[side] += sum(len(p) + 2 for p in paras)
    return {name: "\n\n".join(paras) + "\n" for name, paras in sides.items()}


def builtin_text(name: str) -> str:
    """The offline English text ``name`` (:data:`NAMES`); a one-line InputError for another name, or when
    the machine lacks what the text is read from."""
    if name in DOC_NAMES:
        from .docs import documentation_text

        return documentation_text(name)
    if name in PROSE_NAMES:
        from .prose import prose_text

        return prose_text(name)
    raise InputError(f"unknown built-in text {name!r}; choose one of: {', '.join(NAMES)}")
