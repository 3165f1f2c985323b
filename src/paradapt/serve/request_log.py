"""``paradapt serve --request-log FILE``: one trace line per finished request, written off the hot path.

Each line is a request line of :mod:`paradapt.serve.trace` (``t``, ``adapter``, ``input_len``,
``output_len``) plus what the server measured: ``ttft`` and ``e2e`` (seconds from queued to the
first token and to the end), ``finish_reason`` and ``cached_tokens`` (prompt tokens the prefix
cache served). So the log replays through the twin as it is (``paradapt twin FILE``), and
``paradapt bench FILE`` replays it against a server. Prompts are not logged (they are the users'
text); what prompts share is: ``prefix_hashes`` holds one hash per whole
:data:`~paradapt.serve.workload.PREFIX_UNIT` tokens of the prompt, each over the adapter's name and
every token up to the unit's end (a chain, as the engine's prefix cache keys its pages), keyed
with a secret drawn for this log and never written: no token can be read back and no guess
checked offline, but equal first hashes link two requests that started with the same tokens
for the same adapter (repeated system prompts, the turns of one conversation; docs/twin.md). A
replay turns equal hashes into equal tokens (:func:`~paradapt.serve.workload.leading_ids`), so the twin's prefix
cache and a server replaying the log share what production shared.

Why a writer thread: the engine thread calls :meth:`RequestLog.record` between steps, and a
disk write there (or on the event loop) would stall every running request; ``record`` only
puts a small tuple on a queue. The thread writes each line with one ``write`` call on a
line-buffered file opened for appending, so a line is whole or absent and concurrent readers
never see half a line.

Times: ``t`` counts from the ``start`` (Unix time) in the file's header line, written when the
file is new; a server appending to an existing log continues its time axis. Several servers
may append to one log: ``paradapt serve --replicas N --request-log FILE`` writes the header
first (:func:`start_log`), then every replica appends on that one time axis (wall clocks; on a
real cluster FILE is on shared storage and the nodes' clocks are synchronised), each line one
``write`` to a file opened for appending, so lines from different replicas never mix. Lines come in the
order requests finish; a reader sorts them by ``t`` (silently: the header says it is a log).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .trace import HEADER_KEY, REQUEST_LOG_SOURCE
from .workload import PREFIX_UNIT

if TYPE_CHECKING:
    from .engine import RequestHandle

log = logging.getLogger(__name__)


def prefix_hashes(
    adapter: str | None, prompt: Sequence[int], key: bytes, cache_salt: str | None = None
) -> list[str]:
    """One hex hash per whole :data:`PREFIX_UNIT` tokens of ``prompt``: blake2b keyed with ``key``
    over the previous hash and the unit's tokens, the first rooted in ``adapter``'s name and the
    request's ``cache_salt`` (requests the server kept apart stay apart in a replay)."""
    out: list[str] = []
    h = hashlib.blake2b(repr((adapter, cache_salt)).encode(), key=key, digest_size=8).digest()
    for i in range(len(prompt) // PREFIX_UNIT):
        unit = prompt[i * PREFIX_UNIT : (i + 1) * PREFIX_UNIT]
        h = hashlib.blake2b(h + b",".join(str(t).encode() for t in unit), key=key, digest_size=8).digest()
        out.append(h.hex())
    return out


class RequestLog:
    """Appends finished requests to ``path`` from a daemon thread; :meth:`close` flushes and stops it.

    ``clock`` is the engine's clock (the handles' ``arrival``/``first_token_at``/``finished_at``
    are on it); ``base`` is the base model's served name, written for base-model requests;
    ``prefix_hashes`` False leaves the prompts' hashes out (``--request-log-no-hashes``).
    ``key``: the hashes' secret when several servers append to one log (``paradapt serve
    --replicas``: the driver draws one and hands it to every replica), so a prompt start
    shared across replicas hashes alike; None draws one for this log alone.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        base: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefix_hashes: bool = True,
        key: bytes | None = None,
    ):
        self.path = Path(path)
        self.base = base
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        start = start_log(self.path, base)
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self.origin = clock() - (time.time() - start)  # t = 0 on the engine's clock
        # prefix_hashes: comparable within this log only, never stored (None: not written)
        if key is not None and not (isinstance(key, bytes) and 16 <= len(key) <= 64):
            raise ValueError("a request log's key is 16 to 64 bytes (blake2b's key)")
        self._key = (key or os.urandom(16)) if prefix_hashes else None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="paradapt-request-log", daemon=True)
        self._thread.start()

    def record(self, h: RequestHandle) -> None:
        """Queue a finished generation's line (cheap: the engine thread calls it between steps)."""
        if h.task != "generate" or h.arrival is None or not h.tokens or not h.prompt:
            return
        self._q.put(
            (
                h.arrival,
                h.adapter,
                len(h.prompt),
                len(h.tokens),
                h.first_token_at,
                h.finished_at,
                h.finish_reason,
                h.cached_tokens,
                h.prompt,  # not copied: a finished request's prompt does not change
                h.params.cache_salt,
            )
        )

    def line(self, item: tuple) -> dict[str, Any]:
        """The trace line of a queued item."""
        arrival, adapter, n_in, n_out, first, end, reason, cached, prompt, salt = item
        out = {
            "t": round(arrival - self.origin, 6),
            "adapter": adapter if adapter is not None else self.base,
            "input_len": n_in,
            "output_len": n_out,
            "ttft": None if first is None else round(first - arrival, 6),
            "e2e": None if end is None else round(end - arrival, 6),
            "finish_reason": reason,
            "cached_tokens": cached,  # prompt tokens the prefix cache served (measured; not replayed)
        }
        if self._key is not None:
            out["prefix_hashes"] = prefix_hashes(adapter, prompt, self._key, salt)
        return out

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._file.write(json.dumps(self.line(item)) + "\n")
                self.written += 1
            except (OSError, ValueError):  # a full disk must not stop the server: say so once per line
                log.exception("request log %s: could not write a line", self.path.name)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread and close the file."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout)
        self._file.close()


def start_log(path: str | Path, base: str | None) -> float:
    """Make ``path`` a request log before any server appends to it: its header's ``start``, from
    the existing header, or now (written as the header of a new or empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = _existing_start(path)
    if start is not None:
        return start
    start = time.time()
    with path.open("a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(
                json.dumps({HEADER_KEY: {"start": start, "base": base, "source": REQUEST_LOG_SOURCE}}) + "\n"
            )
    return start


def _existing_start(path: Path) -> float | None:
    """The ``start`` of an existing log's header line (None: new file, or no header)."""
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        head = json.loads(first).get(HEADER_KEY)
        start = head.get("start") if isinstance(head, dict) else None
    except (json.JSONDecodeError, AttributeError):
        return None
    return float(start) if isinstance(start, (int, float)) and not isinstance(start, bool) else None
