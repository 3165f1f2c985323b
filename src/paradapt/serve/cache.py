"""Adapter residency policy over three tiers: disk -> host -> device.

* **disk**: every adapter the server knows (``add_adapter``), loaded on demand;
* **host**: at most ``max_served`` adapters held in host memory (Agullo et al.'s
  "served adapters", vLLM's ``--max-cpu-loras``);
* **device**: at most ``max_slots`` adapters in device slots (Agullo et al.'s "adapter
  slots", vLLM's ``--max-loras``), the adapters one step may use.

Device residents are also host residents (``device <= host``, so ``max_slots <= max_served``).
Both tiers evict least-recently-used first; an adapter pinned by a running request is
never evicted from either tier.

A learned mixture (``pa.Mixture``) *needs* its experts: they are adapters of their own, and the
mixture's gates find them on the model by name. The cache treats a mixture as the set of itself
and its experts (``add_adapter(name, size, needs=experts)``): making it resident, fitting it in a
step, pinning and prefetching it cover the experts too, and each expert counts in the slots and
bytes once however many mixtures and plain requests share it. An expert stays on the device
while a mixture that needs it is there (the mixture leaves first), and a known mixture's expert
cannot be removed. Optional byte budgets (``device_bytes``, ``host_bytes``)
bound the summed adapter sizes next to the counts: the engine derives ``device_bytes`` from
the memory it shares with the KV cache (:class:`MemoryBudget`).

The cache decides and keeps the books; it never touches tensors. Each decision is a
:class:`Move` (plain data) handed, in order, to a pluggable loader: the real engine's moves
weights, the digital twin's adds simulated time. With no loader the moves are only recorded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..checks import is_int
from ..errors import AdapterNotFoundError, ConfigError, ParadaptError

MoveOp = Literal["load_host", "load_device", "evict_device", "evict_host"]
Loader = Callable[["Move"], None]


class AdapterPinnedError(ParadaptError, RuntimeError):
    """An adapter in use by a running request cannot be removed."""


@dataclass(frozen=True)
class Move:
    """One residency change: ``load_host`` (disk -> host), ``load_device`` (host -> device),
    ``evict_device`` (device -> host) or ``evict_host`` (host -> disk)."""

    op: MoveOp
    adapter: str
    size: int
    ahead: bool = False  # a prefetch: the loader may do it in the background, nothing waits for it yet


@dataclass(frozen=True)
class Residency:
    """Outcome of :meth:`AdapterCache.ensure_resident`: the moves made, and the adapters that
    could not be placed now (they wait; nothing raised)."""

    moves: tuple[Move, ...]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing


@dataclass
class CacheStats:
    """Counters for metrics and the twin: hits per tier, loads and evictions per tier."""

    device_hits: int = 0  # needed on device, already there
    host_hits: int = 0  # needed on device, found on host
    disk_misses: int = 0  # needed on device, had to come from disk
    host_loads: int = 0  # disk -> host, on demand
    prefetch_loads: int = 0  # disk -> host, ahead of need
    device_loads: int = 0  # host -> device
    device_evictions: int = 0
    host_evictions: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0


@dataclass(frozen=True)
class MemoryBudget:
    """Device memory shared by the KV cache and the adapter slots (a static split, as vLLM does).

    ``max_slots`` slots of ``slot_bytes`` each are set aside for adapters; the rest holds KV
    entries of ``kv_bytes_per_token`` each. More slots therefore means fewer KV tokens, the
    trade-off Agullo et al. measured (vLLM's KV capacity falls linearly in slots x max rank).
    """

    total_bytes: int
    kv_bytes_per_token: int
    max_slots: int
    slot_bytes: int
    adapter_bytes: int = field(init=False)
    kv_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("total_bytes", "kv_bytes_per_token", "max_slots", "slot_bytes"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {v!r}")
        if self.kv_bytes_per_token == 0:
            raise ConfigError("kv_bytes_per_token", "must be positive")
        adapter_bytes = self.max_slots * self.slot_bytes
        if adapter_bytes >= self.total_bytes:
            raise ConfigError(
                "max_slots",
                f"{self.max_slots} slots x {self.slot_bytes} B = {adapter_bytes} B leave no room for the "
                f"KV cache in {self.total_bytes} B",
            )
        object.__setattr__(self, "adapter_bytes", adapter_bytes)
        object.__setattr__(self, "kv_tokens", (self.total_bytes - adapter_bytes) // self.kv_bytes_per_token)


class AdapterCache:
    """LRU residency of adapters on host and device, with pinning and prefetch.

    ``sizes`` maps every known adapter (the disk tier) to its size in bytes. ``loader`` is
    called with each :class:`Move`, in order, before the books record it: if it raises
    (a corrupt file), the books stay consistent with the moves that did happen.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        max_served: int,
        max_slots: int,
        *,
        device_bytes: int | None = None,
        host_bytes: int | None = None,
        loader: Loader | None = None,
    ):
        _check_count("max_slots", max_slots, 1)
        _check_count("max_served", max_served, 1)
        if max_slots > max_served:
            raise ConfigError(
                "max_slots", f"{max_slots} exceeds max_served={max_served} (device adapters are also served)"
            )
        for name, v in (("device_bytes", device_bytes), ("host_bytes", host_bytes)):
            if v is not None:
                _check_count(name, v, 0)
        self.max_served = max_served
        self.max_slots = max_slots
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        self.loader = loader
        self.stats = CacheStats()
        self._sizes: dict[str, int] = {}
        self._host: OrderedDict[str, None] = OrderedDict()  # LRU first
        self._device: OrderedDict[str, None] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._needs: dict[str, tuple[str, ...]] = {}  # mixture -> its experts
        for name, size in sizes.items():
            self.add_adapter(name, size)

    # -- registry (the disk tier) -------------------------------------------
    def add_adapter(self, name: str, size: int, needs: Iterable[str] = ()) -> None:
        """Make ``name`` known (on disk). Re-adding a known name updates its size if not resident.

        ``needs``: the adapters ``name`` cannot run without (a mixture's experts), already known,
        none of them needing others in turn (a mixture of mixtures is not served).
        """
        if not isinstance(name, str) or not name:
            raise ConfigError("name", f"adapter name must be a non-empty string, got {name!r}")
        _check_count(f"size of {name!r}", size, 0)
        needs = tuple(dict.fromkeys(needs))
        for n in needs:
            if n not in self._sizes:
                raise AdapterNotFoundError(f"adapter {name!r} needs {n!r}, which is not known")
            if n == name or self._needs.get(n):
                raise ConfigError("experts", f"{name!r} needs {n!r}, which needs adapters itself")
        if name in self._host and (self._sizes.get(name) != size or self._needs.get(name, ()) != needs):
            raise ConfigError("size", f"adapter {name!r} is resident; remove it before changing it")
        if needs and self.dependents(name):
            raise ConfigError("experts", f"{name!r} is an expert of {self.dependents(name)}; it cannot need others")
        self._sizes[name] = size
        if needs:
            self._needs[name] = needs
        else:
            self._needs.pop(name, None)

    def needs(self, name: str) -> tuple[str, ...]:
        """The adapters ``name`` needs (a mixture's experts); empty for a plain adapter."""
        return self._needs.get(name, ())

    def dependents(self, name: str) -> list[str]:
        """The known adapters that need ``name`` (the mixtures it is an expert of)."""
        return [m for m, needs in self._needs.items() if name in needs]

    def with_needs(self, names: Iterable[str]) -> list[str]:
        """``names`` with what each needs in front of it (experts before their mixture), once each."""
        out: dict[str, None] = {}
        for n in names:
            for d in self._needs.get(n, ()):
                out[d] = None
            out[n] = None
        return list(out)

    def remove_adapter(self, name: str) -> list[Move]:
        """Forget ``name`` (evicting it from every tier); refused while a request pins it or a
        known mixture needs it (remove the mixture first)."""
        self._require(name)
        if self._pins.get(name):
            raise AdapterPinnedError(f"adapter {name!r} is in use by {self._pins[name]} running request(s)")
        users = self.dependents(name)
        if users:
            raise AdapterPinnedError(
                f"adapter {name!r} is an expert of mixture {', '.join(map(repr, users))}; unload the mixture first"
            )
        moves = []
        if name in self._device:
            moves.append(self._do(Move("evict_device", name, self._sizes[name])))
        if name in self._host:
            moves.append(self._do(Move("evict_host", name, self._sizes[name])))
        del self._sizes[name]
        self._needs.pop(name, None)
        return moves

    def __contains__(self, name: object) -> bool:
        return name in self._sizes

    def size(self, name: str) -> int:
        self._require(name)
        return self._sizes[name]

    def tier(self, name: str) -> Literal["disk", "host", "device"]:
        """Where ``name`` is now."""
        self._require(name)
        return "device" if name in self._device else "host" if name in self._host else "disk"

    @property
    def on_device(self) -> list[str]:
        """Device residents, least recently used first."""
        return list(self._device)

    @property
    def on_host(self) -> list[str]:
        """Host residents (device ones included), least recently used first."""
        return list(self._host)

    def used_bytes(self, tier: Literal["host", "device"]) -> int:
        return sum(self._sizes[n] for n in (self._device if tier == "device" else self._host))

    # -- pinning --------------------------------------------------------------
    def pin(self, name: str) -> None:
        """One more running request uses ``name`` (and what it needs): none may be evicted until unpinned."""
        self._require(name)
        for n in self.with_needs([name]):
            self._pins[n] = self._pins.get(n, 0) + 1

    def unpin(self, name: str) -> None:
        """A request using ``name`` finished or was cancelled."""
        if self._pins.get(name, 0) <= 0:
            raise ParadaptError(f"adapter {name!r} is not pinned")
        for m in self.with_needs([name]):
            n = self._pins.get(m, 0)
            if n <= 1:
                self._pins.pop(m, None)
            else:
                self._pins[m] = n - 1

    def pinned(self, name: str) -> bool:
        return self._pins.get(name, 0) > 0

    # -- feasibility (what the scheduler asks) --------------------------------
    def fits(self, names: Collection[str]) -> bool:
        """Could ``names`` all be on device together (evicting everything else that is unpinned)?

        The scheduler keeps every pinned adapter inside ``names``, so this is exactly
        "can this step's adapters be made resident". A mixture counts with its experts.
        """
        names = self.with_needs(names)
        if len(names) > self.max_slots:
            return False
        if self.device_bytes is None and self.host_bytes is None:
            return True
        total = sum(self._sizes[n] for n in names)
        if self.device_bytes is not None and total > self.device_bytes:
            return False
        return self.host_bytes is None or total <= self.host_bytes

    # -- residency ----------------------------------------------------------
    def ensure_resident(self, names: Iterable[str]) -> Residency:
        """Bring ``names`` onto the device, evicting unpinned LRU adapters as needed.

        Adapters that cannot be placed (every slot pinned by others, or too big for the
        budget) are returned in ``missing``: their requests wait; nothing raises. A mixture
        brings its experts first; it is missing if one of them is.
        """
        wanted = self.with_needs(names)
        for n in wanted:
            self._require(n)
        protect = set(wanted)
        moves: list[Move] = []
        missing: list[str] = []
        for n in wanted:
            if n in self._device:
                self.stats.device_hits += 1
                self._touch(n)
                continue
            lacking = [d for d in self.needs(n) if d in missing]
            if lacking or not self._bring_to_device(n, protect, moves):
                missing.append(n)
        return Residency(tuple(moves), tuple(missing))

    def prefetch(self, names: Iterable[str]) -> list[Move]:
        """Load adapters of queued requests from disk into host memory (not onto the device).

        Only evicts unpinned host residents that are neither on device nor asked for here;
        stops quietly when there is no such room. Its moves are ``ahead``: the real engine reads
        those folders on a background thread while the step's forward runs.
        """
        wanted = self.with_needs(n for n in names if n in self._sizes)
        protect = set(wanted)
        moves: list[Move] = []
        for n in wanted:
            if n in self._host:
                continue
            if not self._make_host_room(self._sizes[n], protect, moves):
                break
            moves.append(self._do(Move("load_host", n, self._sizes[n], ahead=True)))
            self.stats.prefetch_loads += 1
        return moves

    # -- internals ----------------------------------------------------------
    def _bring_to_device(self, n: str, protect: set[str], moves: list[Move]) -> bool:
        size = self._sizes[n]
        if not self._can_ever_place(n, protect):
            return False
        if not self._make_device_room(size, protect, moves):
            return False
        if n in self._host:
            self.stats.host_hits += 1
            self._touch(n)
        else:
            if not self._make_host_room(size, protect, moves):
                return False
            self.stats.disk_misses += 1
            moves.append(self._do(Move("load_host", n, size)))
            self.stats.host_loads += 1
        moves.append(self._do(Move("load_device", n, size)))
        return True

    def _can_ever_place(self, n: str, protect: set[str]) -> bool:
        """Would ``n`` fit next to the adapters that cannot leave (pinned or protected residents)?"""
        stay = [m for m in self._device if m in protect or self.pinned(m)]
        return self.fits([*stay, n])

    def _make_device_room(self, size: int, protect: set[str], moves: list[Move]) -> bool:
        """Evict unpinned, unprotected device residents (LRU first) until ``size`` more fits."""

        def full() -> bool:
            over_bytes = (
                self.device_bytes is not None and self.used_bytes("device") + size > self.device_bytes
            )
            return len(self._device) >= self.max_slots or over_bytes

        while full():
            victim = next((m for m in self._device if self._may_leave_device(m, protect)), None)
            if victim is None:
                break
            moves.append(self._do(Move("evict_device", victim, self._sizes[victim])))
        return not full()

    def _may_leave_device(self, m: str, protect: set[str]) -> bool:
        """Unpinned, unprotected, and no mixture on the device needs it (its gates look it up)."""
        if m in protect or self.pinned(m):
            return False
        return not any(m in self._needs.get(d, ()) for d in self._device)

    def _make_host_room(self, size: int, protect: set[str], moves: list[Move]) -> bool:
        """Evict host residents that are off device, unpinned and unprotected, LRU first."""

        def full() -> bool:
            over_bytes = self.host_bytes is not None and self.used_bytes("host") + size > self.host_bytes
            return len(self._host) >= self.max_served or over_bytes

        victims = [m for m in self._host if m not in self._device and m not in protect and not self.pinned(m)]
        for victim in victims:
            if not full():
                break
            moves.append(self._do(Move("evict_host", victim, self._sizes[victim])))
        return not full()

    def _do(self, move: Move) -> Move:
        """Run ``move`` through the loader, then record it."""
        if self.loader is not None:
            self.loader(move)
        n, s = move.adapter, move.size
        if move.op == "load_host":
            self._host[n] = None
            self.stats.bytes_to_host += s
        elif move.op == "load_device":
            self._device[n] = None
            self._host.move_to_end(n)
            self.stats.device_loads += 1
            self.stats.bytes_to_device += s
        elif move.op == "evict_device":
            del self._device[n]
            self.stats.device_evictions += 1
        else:
            del self._host[n]
            self.stats.host_evictions += 1
        return move

    def _touch(self, n: str) -> None:
        self._host.move_to_end(n)
        if n in self._device:
            self._device.move_to_end(n)

    def _require(self, name: str) -> None:
        if name not in self._sizes:
            raise AdapterNotFoundError(f"unknown adapter {name!r}")


def _check_count(name: str, v: object, minimum: int) -> None:
    if not is_int(v) or v < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {v!r}")
