"""The C++ decode-attention kernel (``csrc/paged_decode.cpp``), built once per machine by
:mod:`paradapt.native` (a C++ compiler and ``ninja`` needed; the build named after the CPU and
the source).

Nothing here is built unless the engine asks for the kernel (``DecodeAttention``'s
``auto``/``kernel`` modes, serve/paged_attention.py), and every failure is an exception that
``auto`` turns into a fallback.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from .. import native

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
_EXTENSION = native.Extension("paged_decode", SOURCE)


def cpu_fingerprint() -> str:
    """What the build's name carries: the CPU's model and flags, and the source (native.py)."""
    return native.cpu_fingerprint(SOURCE)


def load() -> ModuleType:
    """The compiled extension (built on first use; raises if it cannot be built)."""
    return _EXTENSION.load()


__all__ = ["SOURCE", "cpu_fingerprint", "load"]
