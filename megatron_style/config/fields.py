"""Ranges declared on the fields themselves and checked by one generic function.

    micro_batch_size: int = bounded(24, ge=1)
    max_bad_fraction: float = bounded(0.5, gt=0, le=1, note="1 = never stop for bad data")

A value outside its range raises `ConfigError("data.micro_batch_size: must be >= 1, got 0")`.
Floats must also be finite. Only single-field ranges live here; rules that relate two fields
(heads divide dim, loader timeout above read timeout) are in checks.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from megatron_style.config.errors import ConfigError

_NUMBER = (int, float)


@dataclass(frozen=True)
class Bounds:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    off: Optional[float] = None  # a value outside the range that means "off" (e.g. 0)
    note: str = ""

    def admits(self, v: float) -> bool:
        if self.off is not None and v == self.off:
            return True
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        lo = (f"[{_num(self.ge)}" if self.ge is not None else
              f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else
              f"{_num(self.lt)})" if self.lt is not None else None)
        if lo and hi:
            text = f"in {lo}, {hi}"
        elif lo:
            text = (">= " if lo[0] == "[" else "> ") + lo[1:]
        elif hi:
            text = ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        else:
            text = "a finite number"
        if self.off is not None:
            text = f"{_num(self.off)} (off) or {text}"
        return f"{text} ({self.note})" if self.note else text


def _num(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def bounded(default: Any, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None,
            off: Optional[float] = None, note: str = "") -> Any:
    """A dataclass field whose value (or each item, for a list) must lie in the range."""
    meta = {"bounds": Bounds(ge, gt, le, lt, off, note)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_bounds(obj: Any, key: str = "") -> None:
    """Check every bounded field of dataclass `obj` and, recursively, of its sections."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        where = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(v):
            check_bounds(v, where)
            continue
        bounds = f.metadata.get("bounds")
        if bounds is None:
            continue
        for item in (v if isinstance(v, list) else [v]):
            ok = isinstance(item, _NUMBER) and not isinstance(item, bool)
            if ok and isinstance(item, float) and not math.isfinite(item):
                ok = False
            if not ok or not bounds.admits(item):
                finite = "a finite number " if isinstance(item, float) else ""
                raise ConfigError(f"{where}: must be {finite}{bounds.describe()}, got {v!r}")
