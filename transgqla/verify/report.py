"""What ``verify`` measured: one :class:`Check` per property, gathered in a :class:`VerifyReport`.

A check has three outcomes: it held (``ok=True``), it did not (``ok=False``), or it was not run
(``ok=None``: not requested, not applicable, or made meaningless by an earlier failure). Only a
failed check fails the run; a skipped one never does. A figure reported without a bound (fidelity
without thresholds) holds trivially; its status reads "info".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("structure", "paths", "fidelity", "decode")


@dataclass
class Check:
    name: str  # e.g. "structure.manifest"
    ok: bool | None
    value: Any = None  # the measured figure
    threshold: Any = None  # what it is compared against (None: reported only)
    message: str = ""
    comparison: str = ""  # how value meets threshold: "<=", ">=", "==", ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def status(self) -> str:
        """pass / fail / skipped, or "info" for a figure reported without a bound."""
        if self.ok is None:
            return "skipped"
        if not self.ok:
            return "fail"
        return "info" if self.threshold is None else "pass"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "section": self.section,
            "ok": self.ok,
            "status": self.status,
            "value": _plain(self.value),
            "threshold": _plain(self.threshold),
            "comparison": self.comparison,
            "message": self.message,
            "details": _plain(self.details),
        }


def skipped(name: str, why: str) -> Check:
    return Check(name, None, message=why)


def bounded(name: str, value: float, limit: float | None, comparison: str, message: str, **details: Any) -> Check:
    """A figure checked against an optional bound; ``limit=None`` reports it without judging.

    NaN never satisfies a bound."""
    if limit is None:
        ok = True
    elif comparison == "<=":
        ok = bool(value <= limit)
    elif comparison == ">=":
        ok = bool(value >= limit)
    else:
        raise ValueError(comparison)
    return Check(name, ok, value, limit, message, comparison if limit is not None else "", details)


@dataclass
class VerifyReport:
    out: str
    checks: list[Check] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # device, dtype, source, text, seconds

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "out": self.out,
            **_plain(self.info),
            "failed": [c.name for c in self.failed()],
            "checks": [c.to_dict() for c in self.checks],
        }


def _plain(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
