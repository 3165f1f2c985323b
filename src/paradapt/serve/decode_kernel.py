"""Build and load the C++ decode-attention kernel (``csrc/paged_decode.cpp``) once per machine.

The kernel is compiled at run time with :func:`torch.utils.cpp_extension.load`, the way
inductor compiles its own kernels: a C++ compiler and ``ninja`` are needed (``pip install
ninja`` brings the latter; :func:`load` puts its binary on ``PATH``). The build is tuned for the
CPU it runs on (``-march=native``), so the extension's name carries a fingerprint of the CPU's
model and instruction-set flags: machines sharing a home directory (a cluster) never load a
build made for another CPU. Builds are cached in torch's extensions folder; the first one takes
about a minute here, later processes load it in well under a second.

Nothing here is imported unless the engine asks for the kernel (``DecodeAttention``'s
``auto``/``kernel`` modes, serve/paged_attention.py), and every failure is an exception that
``auto`` turns into a fallback.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"

_module: ModuleType | None = None
_lock = threading.Lock()


def cpu_fingerprint() -> str:
    """A short hash of what a ``-march=native`` build depends on: machine, CPU model and flags."""
    parts = [platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                parts.append(line)
                if len(parts) >= 3:
                    break
    except OSError:
        parts.append(platform.processor())
    source = SOURCE.read_bytes()
    return hashlib.sha256("\n".join(parts).encode() + source).hexdigest()[:12]


def _ninja_on_path() -> None:
    """``torch.utils.cpp_extension`` runs ``ninja`` from ``PATH``; the pip package's binary may
    not be there when Python runs from a virtual environment that is not activated."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def load() -> ModuleType:
    """The compiled extension (built on first use; raises if it cannot be built)."""
    global _module
    if _module is not None:  # every decode step's every layer calls this: no lock once loaded
        return _module
    with _lock:
        if _module is None:
            from torch.utils import cpp_extension

            _ninja_on_path()
            _module = cpp_extension.load(
                name=f"paradapt_paged_decode_{cpu_fingerprint()}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                verbose=False,
            )
        return _module


__all__ = ["SOURCE", "cpu_fingerprint", "load"]
