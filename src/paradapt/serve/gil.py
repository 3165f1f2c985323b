"""How often the interpreter hands the GIL between the server's threads (``sys.setswitchinterval``).

Why: ``paradapt serve`` runs the engine in one thread and the HTTP event loop in another, in one
process (vLLM runs its API server and its engine as separate processes). Torch releases the GIL
inside each operator, so the engine thread gives it up and takes it back about a thousand times
a step. When the event loop is running Python at that moment (it formats and streams one chunk
per running request per step), the engine thread waits until the loop blocks in a system call or
until CPython's switch interval, 5 ms by default, makes the loop hand the GIL over. A shorter
interval bounds those waits. Measured with ``benchmarks/vs_vllm.py --systems paradapt`` (random
Llama, base model, 32 streams in flight, one torch thread, 2-core AMD EPYC Zen 4; six pairs of
servers, order alternating, 2026-12-08): 0.2 ms served a median 3.7 % more requests/s than the
default (four pairs +4 to +6 %, two -1 %). The interval is the whole process's, which is the
server's own here.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL = 0.0002  # seconds: paradapt serve's default (CPython's is 0.005)


def set_switch_interval(seconds: float | None) -> float:
    """Set the interpreter's switch interval to ``seconds`` (None or 0: leave it as it is) and
    return the interval now in force."""
    if seconds:
        sys.setswitchinterval(seconds)
    return sys.getswitchinterval()


__all__ = ["SWITCH_INTERVAL", "set_switch_interval"]
