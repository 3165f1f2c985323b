"""Build and load paradapt's C++ extensions (``csrc/*.cpp``, ``serve/csrc/*.cpp``) once per machine.

Each extension is compiled at run time with :func:`torch.utils.cpp_extension.load`, the way
inductor compiles its own kernels: a C++ compiler and ``ninja`` are needed (``pip install
ninja`` brings the latter; :func:`Extension.load` puts its binary on ``PATH``). Builds are tuned
for the CPU they run on (``-march=native``), so an extension's name carries a fingerprint of the
CPU's model and instruction-set flags and of its source: machines sharing a home directory (a
cluster) never load a build made for another CPU, and an edited source is rebuilt. Builds are
cached in torch's extensions folder; a first build takes 30-60 s here, later processes load it
in well under a second.

Nothing is built on import. Every failure is an exception, which callers turn into a fallback
(the decode attention's ``auto`` mode; the banks' measured strategies).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType


def cpu_fingerprint(source: Path) -> str:
    """A short hash of what a ``-march=native`` build of ``source`` depends on: machine, CPU
    model and flags, and the source itself."""
    parts = [platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                parts.append(line)
                if len(parts) >= 3:
                    break
    except OSError:
        parts.append(platform.processor())
    return hashlib.sha256("\n".join(parts).encode() + source.read_bytes()).hexdigest()[:12]


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


class Extension:
    """One C++ source built into one extension module, on first :meth:`load`."""

    def __init__(self, name: str, source: Path):
        self.name, self.source = name, source
        self._module: ModuleType | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether this process has the module (so using it costs no build)."""
        return self._module is not None

    def load(self) -> ModuleType:
        """The compiled module (built on first use; raises if it cannot be built)."""
        if self._module is not None:  # called per step and layer: no lock once loaded
            return self._module
        with self._lock:
            if self._module is None:
                from torch.utils import cpp_extension

                _ninja_on_path()
                self._module = cpp_extension.load(
                    name=f"paradapt_{self.name}_{cpu_fingerprint(self.source)}",
                    sources=[str(self.source)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                    verbose=False,
                )
            return self._module


_HERE = Path(__file__).parent

#: The banks' per-row adapter products (kernels.py's ``kernel`` strategy).
BGMV = Extension("bgmv", _HERE / "csrc" / "bgmv.cpp")

#: A quantised int4 layer's product with float32 rows on CPUs without native bf16 (quantized.py).
INT4_ROWS = Extension("int4_rows", _HERE / "csrc" / "int4_rows.cpp")

#: An int8 layer's product with float32 rows and group (or row) scales: a GGUF's Q8_0 LM head (quantized.py).
INT8_ROWS = Extension("int8_rows", _HERE / "csrc" / "int8_rows.cpp")

__all__ = ["BGMV", "INT4_ROWS", "INT8_ROWS", "Extension", "cpu_fingerprint"]
