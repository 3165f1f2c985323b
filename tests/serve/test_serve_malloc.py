"""serve/malloc.py: after keep_freed_memory a freed 64 MiB block stays in the process (no munmap);
without it glibc hands the block straight back. Each case runs in its own process (mallopt is
process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
from paradapt.serve.malloc import keep_freed_memory, release_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
n = 64 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
touched = rss_mib()
libc.free(p)
after_free = rss_mib()
trimmed = release_freed_memory() if sys.argv[2:] == ["trim"] else False
print(kept, round(touched - after_free), trimmed, round(after_free - rss_mib()))
"""


def run(mode: str, *extra: str) -> tuple[str, int, str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *extra], capture_output=True, text=True, check=True)
    kept, released, trimmed, returned = out.stdout.split()
    return kept, int(released), trimmed, int(returned)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_large_blocks_stay_in_the_heap_only_after_keep_freed_memory():
    kept, released, _, _ = run("keep")
    assert kept == "True" and released < 8  # MiB given back to the OS on free
    kept, released, _, _ = run("default")
    assert kept == "False" and released > 56


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_release_freed_memory_hands_back_what_the_heap_kept():
    """What ``paradapt serve`` does once the model is loaded: the load's freed temporaries, kept
    by the raised thresholds, go back to the system."""
    kept, released, trimmed, returned = run("keep", "trim")
    assert kept == "True" and released < 8 and trimmed == "True"
    assert returned > 56  # of the 64 MiB block
