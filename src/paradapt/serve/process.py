"""``paradapt serve`` as a child process on a free loopback port.

What a client of the real HTTP server drives: ``paradapt showcase`` and
``benchmarks/serve_load.py`` start one, wait for ``/health``, talk to it, and
stop it with SIGTERM (the server drains running requests, then exits).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ParadaptError


class ServerStartError(ParadaptError, RuntimeError):
    """The server exited or did not answer ``/health`` in time; the message quotes its last log line."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m paradapt.cli serve ARGS --port P``; its output goes to ``log`` (a temp file if None)."""

    def __init__(self, args: list[str], log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "paradapt.cli", "serve", *args, "--port", str(self.port)]
        self.log = open(log, "w+") if log else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)

    def wait_healthy(self, timeout: float) -> None:
        """Return once ``/health`` answers 200; raise :class:`ServerStartError` if it exits or times out."""
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ServerStartError(f"the server exited with status {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.25)
        raise ServerStartError(f"the server did not answer /health within {timeout:.0f} s")

    def tail(self) -> str:
        """The last non-empty line the server printed."""
        self.log.flush()
        self.log.seek(0)
        lines = [ln for ln in self.log.read().splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(no output)"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), kill after ``timeout`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
