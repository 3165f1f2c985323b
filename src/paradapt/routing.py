"""Routing: which adapters apply to which rows, decided once per forward.

A *composition* says how several adapters combine on one input:

- a name (``"a"``) or ``Stack("a", "b")``: at each site, apply them in order;
  each sees the previous one's output (``h <- h + delta_a; h <- h + delta_b``).
  Adapters that read the site's input (parallel, LoRA) therefore add up;
  adapters that read its output (series, scale-shift) chain.
- ``Average("a", "b", weights=[.7, .3])``: ``h <- h + sum_i w_i delta_i(h)``
  (weights normalised to sum 1 unless ``normalize=False``).
- ``Parallel("a", "b", None)``: one input through K adapters in one pass: the
  batch is replicated K times, channel ``c`` routed to the c-th entry.

A :class:`RouteMap` maps every row of the batch to a composition. It groups rows by
composition once per batch size and device, and every site and layer reuses
those groups: the model's forward signature never changes.

A *packed* route map (``RouteMap.packed_tokens`` / ``RouteMap.packed_segments``) routes the
tokens of one packed sequence: continuous batching runs every request's tokens
back to back as a single ``[1, T]`` row. Its entries are per token, and hook
sites view ``[1, T, H]`` activations as ``[T, 1, H]`` so each token is a row for
the same groups, segments and banks as a padded batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .banks import Segments
from .checks import is_int
from .errors import RoutingError

Composable = "str | Stack | Average | None"


@dataclass(frozen=True)
class Stack:
    """Apply adapters one after another at every site."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        object.__setattr__(self, "names", _flat_names(names, "Stack"))


@dataclass(frozen=True)
class Average:
    """Weighted average of the adapters' deltas at every site."""

    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __init__(self, *names: str, weights: list[float] | None = None, normalize: bool = True):
        names = _flat_names(names, "Average")
        w = [1.0] * len(names) if weights is None else [float(x) for x in weights]
        if len(w) != len(names):
            raise RoutingError(f"Average: {len(names)} adapters but {len(w)} weights")
        if normalize:
            total = sum(w)
            if total == 0:
                raise RoutingError("Average: weights sum to zero and cannot be normalised")
            w = [x / total for x in w]
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "weights", tuple(w))


@dataclass(frozen=True)
class Parallel:
    """Run one input through several adapters (or the base, ``None``) in one pass."""

    channels: tuple

    def __init__(self, *channels):
        if not channels:
            raise RoutingError("Parallel needs at least one channel")
        for c in channels:
            if isinstance(c, Parallel):
                raise RoutingError("Parallel cannot be nested")
        object.__setattr__(self, "channels", tuple(channels))


def _flat_names(names: tuple, what: str) -> tuple[str, ...]:
    if len(names) == 1 and isinstance(names[0], (list, tuple)):
        names = tuple(names[0])
    if not names:
        raise RoutingError(f"{what} needs at least one adapter name")
    for n in names:
        if not isinstance(n, str):
            raise RoutingError(f"{what} takes adapter names, got {n!r}")
    return tuple(names)


@dataclass(frozen=True)
class Route:
    """A normalised composition: ordered names, mode and weights (hashable, used as a group key)."""

    names: tuple[str, ...]
    mode: str = "stack"  # "stack" | "average"
    weights: tuple[float, ...] = ()


def normalize(comp) -> Route | None:
    """Turn a user composition (name, list, Stack, Average, None) into a Route."""
    if comp is None:
        return None
    if isinstance(comp, str):
        return Route((comp,))
    if isinstance(comp, Stack):
        return Route(comp.names)
    if isinstance(comp, Average):
        return Route(comp.names, "average", comp.weights)
    if isinstance(comp, (list, tuple)):
        return Route(Stack(*comp).names)
    if isinstance(comp, Route):
        return comp
    if isinstance(comp, Parallel):
        raise RoutingError("Parallel cannot be used per row; use pa.set_active or pa.parallel")
    raise RoutingError(f"not a composition: {comp!r} (use a name, a list, Stack, Average or None)")


class Group:
    """Rows (``None`` = all rows) that share one route.

    The row-index tensor is made on first use: mixed batches that go through banks
    never need one per route.
    """

    __slots__ = ("_rows", "_list", "_device", "route", "name")

    def __init__(self, rows, route: Route, device: torch.device | None = None):
        self.route = route
        self.name = single_name(route)  # read at every site of the forward: resolved once
        self._rows = rows if isinstance(rows, torch.Tensor) or rows is None else None
        self._list = None if self._rows is not None or rows is None else rows
        self._device = device

    @property
    def rows(self) -> torch.Tensor | None:
        if self._rows is None and self._list is not None:
            self._rows = torch.tensor(self._list, device=self._device)
        return self._rows

    @property
    def whole(self) -> bool:
        """True when the group covers every row of the batch."""
        return self._rows is None and self._list is None


@dataclass
class RouteMap:
    """Which route each row of one batch takes; groups are computed once per (batch size, device)."""

    routes: list[Route | None]
    uniform: bool = False  # one route for every row, whatever the batch size
    packed: bool = False  # one route per token of a packed [1, T] sequence (tokens are the rows)
    fixed_weights: bool = False  # the caller promises no in-place change: banks skip their check
    _cache: dict = field(default_factory=dict)
    segment_builds: int = 0  # how many times rows were sorted for a bank layout (tests check sharing)

    @classmethod
    def for_all(cls, route: Route | None) -> RouteMap:
        return cls([route], uniform=True)

    @classmethod
    def packed_tokens(cls, routes: list[Route | None]) -> RouteMap:
        """A route map for one packed sequence: ``routes[t]`` is token ``t``'s route."""
        return cls(list(routes), packed=True)

    @classmethod
    def packed_segments(cls, routes: list[Route | None], lengths: list[int]) -> RouteMap:
        """A packed route map from one route per request and the requests' token counts, in order.

        ``lengths`` are the differences of ``cu_seq_lens_q``: request ``i`` owns the next
        ``lengths[i]`` tokens of the packed sequence.
        """
        if len(routes) != len(lengths):
            raise RoutingError(f"packed route: {len(routes)} entries but {len(lengths)} segment lengths")
        for i, n in enumerate(lengths):
            if not is_int(n) or n < 0:
                raise RoutingError(f"packed route: lengths[{i}] must be an integer >= 0, got {n!r}")
        return cls([r for r, n in zip(routes, lengths, strict=True) for _ in range(n)], packed=True)

    def groups(self, batch: int, device: torch.device) -> list[Group]:
        key = (batch, device)
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = self._build(batch, device)
        return got

    def _build(self, batch: int, device: torch.device) -> list[Group]:
        if self.uniform:
            route = self.routes[0]
            return [] if route is None else [Group(None, route)]
        n = len(self.routes)
        if self.packed and batch != n:
            raise RoutingError(
                f"packed route has {n} token entries but the packed sequence has {batch} tokens; "
                "give one entry per token (or per request with its segment lengths)"
            )
        if batch % n != 0:
            raise RoutingError(
                f"route has {n} entries but the batch has {batch} rows; give one entry per row "
                "(beam search and num_return_sequences repeat each entry automatically)"
            )
        per = batch // n  # beams / returned sequences repeat each row contiguously
        rows_of: dict[Route, list[int]] = {}
        for i, route in enumerate(self.routes):
            if route is not None:
                rows_of.setdefault(route, []).extend(range(i * per, (i + 1) * per))
        if len(rows_of) == 1 and sum(len(v) for v in rows_of.values()) == batch:
            return [Group(None, next(iter(rows_of)))]
        return [Group(rows, route, device) for route, rows in rows_of.items()]

    def names(self) -> set[str]:
        return {n for r in self.routes if r is not None for n in r.names}

    def row_names(self, batch: int) -> list[str | None]:
        """Per row, its adapter's name when the row uses exactly one adapter (else ``None``)."""
        key = ("names", batch)
        got = self._cache.get(key)
        if got is None:
            simple = [single_name(r) for r in self.routes]
            per = max(batch // len(simple), 1)  # rows repeat contiguously (beams, Parallel channels)
            got = self._cache[key] = [simple[min(i // per, len(simple) - 1)] for i in range(batch)]
        return got

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` for this forward: what every site and layer of it shares."""
        got = self._cache.get(key)
        if got is None:
            got = self._cache[key] = build()
        return got

    def segments(self, layout, batch: int, device: torch.device):
        """Rows sorted by ``layout``'s slots, built once per forward and shared by every site with it."""
        key = ("seg", batch, device, layout)
        if key not in self._cache:
            self.segment_builds += 1
            self._cache[key] = Segments.build(self.row_names(batch), layout, device)
        return self._cache[key]


def single_name(route: Route | None) -> str | None:
    """The adapter of a one-adapter route (what banks batch); compositions go the general way."""
    if route is None or len(route.names) != 1:
        return None
    return route.names[0] if route.mode == "stack" or route.weights == (1.0,) else None
