"""CPU time of a ``paradapt serve --replicas N`` process tree, by role (Linux ``/proc``).

What the cluster twin's Ray cost needs (:mod:`paradapt.twin.ray_cost`): how much CPU each
replica's actor process used, and how much everything else did (the serve driver, Ray's proxy,
the ingress, Serve's controller, the raylet, GCS and agents), over a measured run. Ray names an
actor's process after its deployment (``ray::ServeReplica:<app>:replica-0``, with
``.<method>`` appended while it runs a call), so the role is the last ``:``-part of that word
up to a ``.``; every other process of the tree is ``ray``.

No ``psutil``: ``/proc/<pid>/stat`` and ``/proc/<pid>/task/*/children`` hold all of it. A
process that ends between two readings is left out of the later one.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
OTHER = "ray"  # the role of every process that is not a replica's or the ingress's actor


def cpu_seconds(pid: int, proc: Path = PROC) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (None: gone or unreadable)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """``pid`` and every process below it, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        try:
            tasks = list((proc / str(p) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return out


def role_of(title: str) -> str:
    """A process's role from its title: a Serve actor's deployment name, else :data:`OTHER`."""
    word = next((w for w in title.split() if "ServeReplica" in w), None)
    return OTHER if word is None else word.rsplit(":", 1)[-1].split(".", 1)[0]


def cpu_by_role(pid: int, proc: Path = PROC) -> dict[str, float]:
    """CPU seconds used so far by the process tree under ``pid``, summed by :func:`role_of`."""
    out: dict[str, float] = {OTHER: 0.0}
    for p in descendants(pid, proc):
        seconds = cpu_seconds(p, proc)
        if seconds is None:
            continue
        try:
            title = (proc / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = role_of(title)
        out[role] = out.get(role, 0.0) + seconds
    return out
