"""``paradapt profile-ray``: one Ray Serve replica under a saturating load, measured for the twin.

Starts ``paradapt serve --replicas 1`` (its own local Ray) with the caller's model, adapters
and engine flags, replays the workload through the project's load client
(:func:`paradapt.bench.send`), and reads the CPU time of each role of the server's process tree
before and after (:func:`paradapt.cluster.cpu.cpu_by_role`; the load client is this process).
:func:`paradapt.twin.ray_cost.fit_ray_cost` then turns the :class:`RayRun` into the cost
model's ``ray`` section.

The workload must saturate the replica (it served less than :data:`SATURATED` of the offered
tokens/s): below the knee throughput equals the offered load whatever a token costs, and
nothing could be fitted.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..serve.process import ServerProcess
from ..twin.ray_cost import RayRun
from .cpu import cpu_by_role

if TYPE_CHECKING:
    from ..bench import BenchConfig, Outcome
    from ..serve.workload import Workload
    from ..twin.metrics import TwinResult

SATURATED = 0.9  # a run serving less than this share of the offered tokens/s is saturated
START_TIMEOUT = 300.0  # seconds for Ray and the replica to come up


def measure_replica(
    serve_args: Sequence[str], workload: Workload, config: BenchConfig, *, log: Path | None = None
) -> tuple[RayRun, TwinResult]:
    """Run ``workload`` against ``paradapt serve --replicas 1 SERVE_ARGS`` (``config.url`` is
    replaced by the server's); the run's throughput and CPU by role, and the client's metrics."""
    from ..bench import result_of, send

    server = ServerProcess(["--replicas", "1", *serve_args], log=log)
    try:
        server.wait_healthy(timeout=START_TIMEOUT)
        config = replace(config, url=server.url)
        before, t0 = cpu_with_client(server.proc.pid), time.monotonic()
        outcomes, duration = send(workload, config, source="profile-ray")
        after, wall = cpu_with_client(server.proc.pid), time.monotonic() - t0
    finally:
        server.stop()
    result = result_of(workload, config, outcomes, duration)
    served = served_tokens(workload, outcomes)
    if served == 0:
        raise ConfigError("workload", f"the replica served none of its {len(workload.requests)} requests")
    cpu = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
    run = RayRun(result.throughput, cpu, wall, served, os.cpu_count() or 1)
    return run, result


def check_saturated(run: RayRun, workload: Workload) -> None:
    """A :class:`ConfigError` unless the replica served less than :data:`SATURATED` of the offer."""
    offered = workload.offered_tokens() / workload.duration
    if run.throughput >= SATURATED * offered:
        raise ConfigError(
            "workload",
            f"one replica kept up with it ({run.throughput:.0f} of {offered:.0f} offered tokens/s): "
            f"nothing to fit below saturation; raise its rate",
        )


def cpu_with_client(pid: int) -> dict[str, float]:
    """CPU seconds so far by role of the server's tree under ``pid``, and ``client``: this
    process (the load client)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {**cpu_by_role(pid), "client": me.ru_utime + me.ru_stime}


def served_tokens(workload: Workload, outcomes: Mapping[int, Outcome]) -> int:
    """Prompt and output tokens of the requests served in full (what the CPU time was spent on)."""
    return sum(
        r.prompt_len + r.output_len
        for r in workload.requests
        if r.id in outcomes and outcomes[r.id].status == "ok"
    )
