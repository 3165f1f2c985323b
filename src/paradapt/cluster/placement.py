"""A planned placement for the real cluster: which adapters each replica holds from the start.

``paradapt plan WORKLOAD --replicas N --json plan.json`` places adapters in the cluster twin
(:func:`paradapt.twin.cluster_plan.place_adapters`: hot adapters replicated by their load,
each copy on the least loaded replica). ``paradapt serve --replicas N --placement plan.json``
applies it: each replica reads its share into host memory before it serves (hottest last, so
its LRU keeps them longest), and the router starts from the map (``Router.preplace``), as the
twin did when it predicted the plan's numbers. Without it the router places adapters as
requests come, and a hot adapter spills to at most ``max_replicas_per_adapter`` replicas.

The file is input like any other: it may be missing, not JSON, planned for another replica
count or name adapters the server cannot serve; each is an error naming the file and the
field, before any replica starts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..lifecycle import check_name

FLAG = "placement"


def read_placement(path: str | Path, replicas: int) -> tuple[tuple[str, ...], ...]:
    """The adapters of each replica (replica-0 first, each hottest first, no repeats) from a
    plan file written by ``paradapt plan --replicas N --json FILE`` (its ``placement.replicas``),
    or a file holding just that list of lists."""
    data, where = _load(Path(path)), Path(path).name
    if isinstance(data, dict):  # a plan: its placement.replicas
        section = data.get("placement")
        lists = section.get("replicas") if isinstance(section, dict) else None
        where += ": placement.replicas"
    else:
        lists = data
    if not isinstance(lists, list) or not all(isinstance(x, list) for x in lists):
        raise ConfigError(FLAG, f"{where}: expected a list with one list of adapter names per replica")
    if len(lists) != replicas:
        raise ConfigError(
            FLAG,
            f"{where} places adapters on {len(lists)} replicas but --replicas is {replicas}: "
            f"plan again with --replicas {replicas}, or serve with --replicas {len(lists)}",
        )
    out = []
    for i, names in enumerate(lists):
        for j, name in enumerate(names):
            try:
                check_name(name)
            except ConfigError as e:
                raise ConfigError(FLAG, f"{where}[{i}][{j}]: {e.message}") from None
        out.append(tuple(dict.fromkeys(names)))
    return tuple(out)


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(FLAG, f"{path.name}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(FLAG, f"{path.name}: not a readable JSON plan ({type(e).__name__})") from None


def unknown_adapters(placement: tuple[tuple[str, ...], ...], known: set[str]) -> list[str]:
    """The placed adapters the server does not know (no folder under its adapter root)."""
    return sorted({n for names in placement for n in names} - known)
