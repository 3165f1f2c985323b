"""Per-model paradapt state: sites, adapters, the active composition and the route in force.

One :class:`State` hangs off a model (``model._paradapt_state``, a plain
attribute) and all adapter weights live in one child ``model.paradapt``
(``nn.ModuleDict`` of adapter name -> :class:`AdapterModule`), so one adapter's
weights are ``model.paradapt[name].state_dict()`` and the base model's keys are
untouched. Module names are snapshotted once, when the state is created, so
resolving targets never walks the adapters already added: adding the 500th
adapter costs what the first did.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from . import archmap
from .config import AdapterConfig
from .errors import AdapterNotFoundError, RoutingError
from .prefix_attention import AttentionSite
from .routing import Group, Parallel, Route, RouteMap, normalize
from .sites import BlockSite, LinearSite, Site

CONTAINER = "paradapt"
ATTR = "_paradapt_state"


class AdapterModule(nn.Module):
    """All weights of one adapter: one component per site (keys are site names with '/' for '.')."""

    def __init__(self):
        super().__init__()
        self.components = nn.ModuleDict()

    @staticmethod
    def slot(site_key: str) -> str:
        return site_key.replace(".", "/")

    def add(self, site_key: str, component: nn.Module) -> None:
        self.components[self.slot(site_key)] = component


@dataclass
class AdapterRecord:
    """What paradapt knows of one adapter besides its weights."""

    name: str
    config: AdapterConfig
    sites: list[str] = field(default_factory=list)
    merged: bool = False
    fused: object = None  # set by paradapt.fusing while the adapter lives inside the FFN's weights
    base_info: dict = field(default_factory=dict)


_ids = itertools.count()


def _new_route_var() -> contextvars.ContextVar:
    return contextvars.ContextVar(f"paradapt_route_{next(_ids)}", default=None)


class State:
    """Everything paradapt attaches to one model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.names: list[str] = list(self.modules)
        self.linear_names: list[str] = [n for n, m in self.modules.items() if archmap.is_linear(m)]
        self.arch = archmap.detect(self.modules)
        self.sites: dict[str, Site] = {}
        self.adapters: dict[str, AdapterRecord] = {}
        self.merged: set[str] = set()
        self.active: Route | Parallel | None = None
        self._active_map: RouteMap | None = None
        self._route = _new_route_var()
        self._parallel_tokens: dict[int, contextvars.Token] = {}  # per thread, like the route itself
        # per thread: (mixture, load-balancing term) of each gate in the latest forward with autograd
        self._gate_losses: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._masks: dict[int, torch.Tensor | None] = {}  # per thread: the forward's attention_mask
        self.container = nn.ModuleDict()
        model.add_module(CONTAINER, self.container)
        self._root_handles = [
            model.register_forward_pre_hook(self._parallel_pre, with_kwargs=True),
            model.register_forward_hook(self._parallel_post, always_call=True),
        ]

    # -- lookup ---------------------------------------------------------------------
    def record(self, name: str) -> AdapterRecord:
        rec = self.adapters.get(name)
        if rec is None:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterNotFoundError(f"no adapter named {name!r} on this model (loaded: {known})")
        return rec

    def check_names(self, names) -> None:
        for n in names:
            self.record(n)

    # -- sites ------------------------------------------------------------------------
    def block_site(self, key: str, entry: str, exit: str) -> Site:
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = BlockSite(
                key, self, self.modules[entry], self.modules[exit], entry, exit
            )
        return site

    def linear_site(self, name: str) -> Site:
        site = self.sites.get(name)
        if site is None:
            m = self.modules[name]
            site = self.sites[name] = LinearSite(name, self, m, m, name, name)
        return site

    def attention_site(self, name: str) -> Site:
        site = self.sites.get(name)
        if site is None:
            site = self.sites[name] = AttentionSite(name, self, self.modules[name])
        return site

    def replace_module(self, name: str, old: nn.Module, new: nn.Module) -> None:
        """Module ``name`` is now ``new`` (a quantised or dequantised linear): the snapshot and
        every site hooked on ``old`` follow it, so adapters keep working beside the new module."""
        if self.modules.get(name) is old:
            self.modules[name] = new
        for site in self.sites.values():
            if getattr(site, "entry", None) is not old and getattr(site, "exit", None) is not old:
                continue
            site.remove_hooks()
            if site.entry is old:
                site.entry = new
            if site.exit is old:
                site.exit = new
            site.attach_hooks()

    # -- routing ----------------------------------------------------------------------
    def route_map(self) -> RouteMap | None:
        """The route map in force for the forward running now (route context first, then the active one)."""
        m = self._route.get()
        return m if m is not None else self._active_map

    def set_active(self, comp) -> None:
        if isinstance(comp, Parallel):
            for c in comp.channels:
                route = normalize(c)
                if route is not None:
                    self.check_names(route.names)
            self.active, self._active_map = comp, None
            return
        route = normalize(comp)
        if route is not None:
            self.check_names(route.names)
        self.active = route
        self._active_map = None if route is None else RouteMap.for_all(route)

    def push_route(self, route_map: RouteMap):
        return self._route.set(route_map)

    def pop_route(self, token) -> None:
        self._route.reset(token)

    # -- mixtures' load-balancing terms: kept for the latest forward only ---------------------
    def gate_loss_recorder(self, name: str):
        """A callback a mixture's gate calls with its load-balancing term (``gate.MixtureOp``)."""

        def record(term: torch.Tensor) -> None:
            self._gate_losses.setdefault(threading.get_ident(), []).append((name, term))

        return record

    def gate_losses(self) -> list[tuple[str, torch.Tensor]]:
        """This thread's terms from its latest forward (cleared when its next forward starts)."""
        return self._gate_losses.get(threading.get_ident(), [])

    def pool_mask(self, rows: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The running forward's 2-D ``attention_mask`` (its ``rows``), for a sequence gate to
        pool real tokens only; None when the forward was given none or it does not fit ``batch``."""
        m = self._masks.get(threading.get_ident())
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != batch:
            return None
        return m if rows is None else m.index_select(0, rows.to(m.device))

    # Parallel: replicate the batch K times at the model's input, route channel c to entry c.
    _BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels")

    def _parallel_pre(self, module, args, kwargs):
        tid = threading.get_ident()
        self._gate_losses.pop(tid, None)  # a new forward: the last one's terms go
        self._masks[tid] = kwargs.get("attention_mask")
        comp = self.active
        if not isinstance(comp, Parallel) or self._route.get() is not None:
            return None
        if kwargs.get("past_key_values") is not None:  # generate passes a cache, even on its first step
            raise RoutingError(
                "Parallel is for single forward passes; to generate, use pa.route with repeated inputs"
            )
        k = len(comp.channels)
        args = tuple(_repeat(a, k) for a in args)
        kwargs = {key: (_repeat(v, k) if key in self._BATCH_KEYS else v) for key, v in kwargs.items()}
        routes = [normalize(c) for c in comp.channels]
        self._masks[tid] = kwargs.get("attention_mask")
        self._parallel_tokens[tid] = self._route.set(_ChannelRouteMap(routes))
        return args, kwargs

    def _parallel_post(self, module, args, output):
        token = self._parallel_tokens.pop(threading.get_ident(), None)
        if token is not None:
            self._route.reset(token)
        return None

    # -- copying: a ContextVar cannot be pickled; a copy gets a fresh one (and no route in force) --
    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d.pop("_route")
        d["_parallel_tokens"] = {}
        d["_gate_losses"] = {}  # autograd graph tensors cannot be copied
        d["_masks"] = {}
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._route = _new_route_var()

    # -- removal ----------------------------------------------------------------------
    def detach(self) -> None:
        for site in self.sites.values():
            site.remove_hooks()
        for h in self._root_handles:
            h.remove()
        self.sites.clear()
        if CONTAINER in self.model._modules:
            del self.model._modules[CONTAINER]


def _repeat(t, k: int):
    return t.repeat(k, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) else t


class _ChannelRouteMap(RouteMap):
    """Rows ``[c*B, (c+1)*B)`` follow channel ``c``'s route (the layout ``Parallel`` builds)."""

    def __init__(self, routes: list[Route | None]):
        super().__init__(routes)

    def _build(self, batch: int, device: torch.device):
        k = len(self.routes)
        per = batch // k
        return [
            Group(torch.arange(c * per, (c + 1) * per, device=device), r)
            for c, r in enumerate(self.routes)
            if r is not None
        ]


def get_state(model: nn.Module, create: bool = False) -> State | None:
    st = model.__dict__.get(ATTR)
    if st is None and create:
        st = State(model)
        model.__dict__[ATTR] = st
    return st


def require_state(model: nn.Module) -> State:
    st = get_state(model)
    if st is None:
        raise AdapterNotFoundError(
            "this model has no paradapt adapters (call pa.add_adapter or pa.load_adapter first)"
        )
    return st
