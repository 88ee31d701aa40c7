"""User-facing failures: each carries a one-line message and a process exit code.

The CLI maps these to `error: <message>` on stderr and `exit_code`; anything else
is a bug and keeps its traceback.
"""


class TransGQLAError(Exception):
    """Base class of expected failures."""

    exit_code = 1


class InputError(TransGQLAError):
    """The source checkpoint, its config or the flags are unusable."""

    exit_code = 2


class UnsupportedError(TransGQLAError):
    """A model family or feature transgqla does not convert."""

    exit_code = 3


class OutputError(TransGQLAError):
    """The output folder cannot be written (non-empty, disk full, inside the source)."""

    exit_code = 4


class VerificationError(TransGQLAError):
    """A checkpoint failed a verify check."""

    exit_code = 5
