"""Text, from a source to token windows, for every command that reads any: calibration, ``eval-ppl``,
``verify`` and the export check.

* :mod:`.pipeline` -- the one pipeline: read sources, tokenize (no special tokens), cut non-overlapping
  windows; the fixed prompt and the fallback ids for checkpoints without a tokenizer.
* :mod:`.builtin` -- the offline texts by name (``builtin:calib``, ``builtin:eval``, ``builtin:prose-calib``,
  ``builtin:prose-eval``) and the rule that splits a collection into disjoint halves.
* :mod:`.docs` -- the documentation texts, read from the running CPython's own documentation.
* :mod:`.prose` -- the general-English texts, read from Debian's fortune collections.
"""
