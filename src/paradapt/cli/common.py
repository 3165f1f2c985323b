"""What every ``paradapt`` command shares: its error class, argument types, one-line warnings."""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

from ..errors import ParadaptError

#: ``--quantize`` and ``--quantize-lm-head`` (serve, profile): the precisions of paradapt.quantized
#: (not imported here: it imports torch, which the twin's commands do without).
QUANTIZE_CHOICES = ("none", "bf16", "int8", "int4")


class CLIError(ParadaptError):
    """A command-line problem (bad path, missing package); printed as one line, exit 2."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def positive_int(s: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _finite(s: str, at_least_zero: bool) -> float:
    """``s`` as a finite number above 0 (or, ``at_least_zero``, of at least 0), else an argparse error."""
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not (math.isfinite(x) and (x >= 0 if at_least_zero else x > 0)):
        raise argparse.ArgumentTypeError(
            f"must be a number >= 0, got {s!r}" if at_least_zero else f"must be a positive number, got {s!r}"
        )
    return x


def positive_float(s: str) -> float:
    """An argparse type: a finite number above 0."""
    return _finite(s, at_least_zero=False)


def non_negative_float(s: str) -> float:
    """An argparse type: a finite number of at least 0."""
    return _finite(s, at_least_zero=True)


def csv_of(kind):
    """An argparse type: a comma-separated list of ``kind`` values (``8,16,32``)."""
    return lambda s: [kind(x) for x in s.split(",") if x]


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``warnings.showwarning``: warnings (e.g. the truncation count) as one
    ``paradapt: warning:`` line, not a source excerpt."""
    print(f"paradapt: warning: {message}", file=file or sys.stderr)


def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Recorded warnings, one ``paradapt: warning:`` line each."""
    for w in caught:
        print(f"paradapt: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
