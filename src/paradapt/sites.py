"""Sites: the places in a frozen model where adapter deltas are added.

Three kinds, each attached with hooks on the *original* modules, so the base
model's module tree and state-dict keys never change and ``unwrap`` restores it
exactly (the first two live here, with what every site shares):

- ``BlockSite``: a block (FFN or attention) given by an *entry* module, whose
  input ``x`` it reads, and an *exit* module, whose output ``h`` (before the
  residual add and norm) it changes. For Llama and GPT-2 entry and exit are the
  same module (``mlp``); BERT's FFN spans ``intermediate`` and ``output.dense``
  (the residual and LayerNorm sit inside ``output``), so the parallel adapter
  still adds before that norm, as He et al. define it.
- ``LinearSite``: one linear (or GPT-2 ``Conv1D``); entry and exit are the same
  module. Components here may be merged into its weight.
- ``AttentionSite`` (``prefix_attention.py``): the attention function of one
  self-attention module, for prefixes. Hooked through transformers' own
  ``AttentionInterface`` registry.

Every component of a block or linear site exposes ``delta(src)``; the site computes
``h <- h + delta`` for the rows each route of the current
:class:`~paradapt.routing.RouteMap` covers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import mixture_banks
from .banks import Bank, bankable, signature
from .errors import RoutingError
from .gate import MixtureGate, MixtureOp
from .routing import Group, Route, RouteMap

if TYPE_CHECKING:
    from .state import State


class Site:
    """Components of several adapters at one place, keyed by adapter name."""

    kind = ""

    def __init__(self, key: str, state: State):
        self.key = key
        self.state = state
        self.components: dict[str, nn.Module] = {}
        self.banks: dict[tuple, Bank] = {}  # signature -> stacked bottlenecks for mixed batches
        self._bank_of: dict[str, Bank] = {}
        # adapter -> (component, bank) whose slot may be reused unchecked under fixed_weights
        # (Bank.trusted): a mixed decode step looks each row's adapter up here at every site
        self._trusted: dict[str, tuple[nn.Module, Bank]] = {}
        self._bank_lock = threading.Lock()
        self._handles: list = []
        self._input_writers: bool | None = None  # cache of writes_input(); None = recompute

    def add(self, name: str, comp: nn.Module) -> None:
        """Put an adapter's component at this site (what :meth:`drop` undoes)."""
        self.components[name] = comp
        self._input_writers = None

    def writes_input(self) -> bool:
        """Whether any component here may change the site's input (a series adapter before the
        module, a scale on its input, a mixture whose experts might): if none does, the entry
        hook has nothing to do for any route, and a mixed batch of 32 adapters skips a loop over
        its 32 groups per site per step."""
        if self._input_writers is None:
            self._input_writers = any(getattr(c, "writes", "output") != "output" for c in self.components.values())
        return self._input_writers

    # copies (deepcopy, pickle) leave the banks behind: they are a cache, rebuilt on first use
    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d.update(banks={}, _bank_of={}, _trusted={}, _bank_lock=None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._trusted = {}  # a cache (and absent from copies pickled before it existed)
        self._bank_lock = threading.Lock()
        self._input_writers = None

    def unbank(self, name: str) -> None:
        """Free an adapter's bank slot (it is refilled from its parameters when next banked)."""
        self._trusted.pop(name, None)
        if name in self._bank_of:
            with self._bank_lock:
                bank = self._bank_of.pop(name, None)
                if bank is not None:
                    bank.remove(name)

    def drop(self, name: str) -> nn.Module:
        """Take an adapter's component (and its bank slot) out of this site."""
        self.unbank(name)
        self._input_writers = None
        return self.components.pop(name)

    def bank_for(self, name: str, comp: nn.Module, device: torch.device, check: bool = True) -> Bank:
        """The bank holding ``name``'s current weights on ``device`` (inserting or recopying as needed).

        ``check=False`` (a route with ``fixed_weights``) reuses a slot the adapter already has
        without checking its source tensors for in-place changes, unless they required a
        gradient when copied (an adapter being trained is always checked)."""
        bank = self._bank_of.get(name)
        if bank is not None and bank.device == device:
            if (not check and bank.trusted(name)) or bank.fresh(name, comp):
                return bank
        with self._bank_lock:  # forwards in several threads may fill the same bank
            self._trusted.pop(name, None)
            bank = self._bank_of.get(name)
            if bank is not None and bank.device == device:
                if bank.fresh(name, comp):
                    return bank
                if bank.fits(comp):
                    bank.refresh(name, comp)
                    return bank
            if bank is not None:
                bank.remove(name)
            sig = signature(comp, device)
            bank = self.banks.get(sig)
            if bank is None:
                bank = self.banks[sig] = Bank(comp, device)
            bank.insert(name, comp)
            self._bank_of[name] = bank
            return bank

    def ops(
        self, route: Route, writes: str, rows: torch.Tensor | None = None, batch: int = 0
    ) -> list[tuple[nn.Module | MixtureOp, float]]:
        """The components this route applies here, in order, with their weights.

        A mixture's gate is bound to its experts' components here (``gate.MixtureOp``); a
        sequence gate also gets the padding mask of its ``rows`` (of a ``batch``-row batch).
        """
        out = []
        merged = self.state.merged
        for i, name in enumerate(route.names):
            c = self.components.get(name)
            if c is None or name in merged:
                continue
            if isinstance(c, MixtureGate):
                mask = (lambda: self.state.pool_mask(rows, batch)) if c.granularity == "sequence" else None
                record = self.state.gate_loss_recorder(name) if torch.is_grad_enabled() else None
                c = c.op(self.components, writes, record, mask)
            elif c.writes != writes:
                continue
            if c is not None:
                out.append((c, route.weights[i] if route.mode == "average" else 1.0))
        return out

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_ops(
    ops: list[tuple[nn.Module, float]], mode: str, h: torch.Tensor, x: torch.Tensor | None
) -> torch.Tensor:
    """``h <- h + delta`` for each op (stack) or ``h <- h + sum w_i delta_i`` (average)."""
    if mode == "stack":
        for c, _ in ops:
            h = h + _delta(c, h, x).to(h.dtype)
        return h
    acc = None
    for c, w in ops:
        d = _delta(c, h, x) * w
        acc = d if acc is None else acc + d
    return h if acc is None else h + acc.to(h.dtype)


def _delta(c: nn.Module | MixtureOp, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """One op's delta: from the site's input or output as the component reads it (a mixture
    reads both: its router the input, each expert its own source)."""
    if isinstance(c, MixtureOp):
        return c.delta(h, x)
    src = x if (c.reads == "input" and c.writes == "output") else h
    return c.delta(src)


def _still_trusted(site: Site, name: str, hit: tuple[nn.Module, Bank], merged, device: torch.device) -> bool:
    """Whether a remembered (component, bank) may be used as is: the same component is still at
    the site, not merged, not in training mode, and its bank is on this device and still holds
    its slot (every path that frees or moves one forgets the entry first, Site.unbank and
    bank_for; the slot check covers a forward in another thread that remembered it meanwhile)."""
    comp, bank = hit
    return (
        site.components.get(name) is comp
        and not comp.training
        and name not in merged
        and bank.device == device
        and name in bank
    )


def apply_banks(
    site: Site, route_map: RouteMap, groups: list[Group], h: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, list[Group]]:
    """Add every one-adapter row's bottleneck delta through the site's banks, in one pass per bank,
    and a mixture's rows' experts through the same banks (``mixture_banks``: one more pass per
    bank its experts are in).

    Returns the new ``h`` and the groups still to do the general way (compositions,
    non-bottleneck components, adapters in training mode, mixtures with such experts here).
    """
    rest, used, pending = [], {}, []
    merged = site.state.merged
    check = not route_map.fixed_weights
    trusted = site._trusted
    for g in groups:
        name = g.name
        hit = None if check else trusted.get(name)
        if hit is not None and _still_trusted(site, name, hit, merged, h.device):
            used[id(hit[1])] = hit[1]
            continue
        comp = site.components.get(name) if name is not None else None
        if name is not None and (comp is None or name in merged):
            continue  # nothing of this adapter here
        if isinstance(comp, MixtureGate) and mixture_banks.bankable_gate(site.components, comp):
            p = mixture_banks.prepare(site, g.route, g.rows, h, x, check)
            if p is not None:
                pending.append(p)
            continue
        if comp is None or not bankable(comp) or comp.training:
            if name is not None:
                site.unbank(name)  # else its slot would still match these rows' segments
            rest.append(g)
            continue
        bank = site.bank_for(name, comp, h.device, check)
        used[id(bank)] = bank
        if not check and bank.trusted(name):
            trusted[name] = (comp, bank)
    batch = h.shape[0]
    out = h
    for bank in used.values():
        seg = route_map.segments(bank.layout, batch, h.device)
        if seg is None:
            continue
        src = x if bank.reads == "input" else h
        fused = bank.add_fused(out, src, seg)
        if fused is not None:
            out = fused
            continue
        if seg.perm is not None:
            src = src.index_select(0, seg.perm)
        d = bank.delta(src.reshape(src.shape[0], -1, src.shape[-1]), seg)
        d = d.reshape(d.shape[0], *h.shape[1:-1], d.shape[-1]).to(h.dtype)
        out = out + d if seg.perm is None else out.index_add(0, seg.perm, d)
    acc = mixture_banks.apply(pending, h, x, route_map.cached) if pending else None
    return (out if acc is None else out + acc.to(h.dtype)), rest


def transform(
    site: Site, route_map: RouteMap, groups: list[Group], h: torch.Tensor, x: torch.Tensor | None, writes: str
) -> torch.Tensor:
    """Apply each group's route to its rows; rows of no group pass through unchanged.

    Mixed batches at inference (no autograd) go through the site's banks, a mixture's
    bankable experts included; training and compositions take the per-group path, which
    autograd sees through.
    """
    if len(groups) == 1 and groups[0].whole:
        ops = site.ops(groups[0].route, writes, None, h.shape[0])
        return run_ops(ops, groups[0].route.mode, h, x) if ops else h
    if writes == "output" and not torch.is_grad_enabled():
        h, groups = apply_banks(site, route_map, groups, h, x)
    out = None
    for g in groups:
        ops = site.ops(g.route, writes, g.rows, h.shape[0])
        if not ops:
            continue
        hg = h.index_select(0, g.rows)
        xg = x.index_select(0, g.rows) if x is not None else None
        if out is None:
            out = h.clone()
        out.index_copy_(0, g.rows, run_ops(ops, g.route.mode, hg, xg))
    return h if out is None else out


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_first_arg(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _batch(t: torch.Tensor) -> int:
    return t.shape[0]


def as_rows(route_map: RouteMap, t: torch.Tensor, key: str) -> torch.Tensor:
    """The rows a route map routes: the batch rows, or for a packed one the tokens of ``[1, T, ...]``.

    The packed view is ``t.transpose(0, 1)`` (``[T, 1, ...]``), free since the batch is one row,
    so groups, segments and banks see tokens exactly as they see rows of a padded batch.
    """
    if not route_map.packed:
        return t
    if t.dim() < 3 or t.shape[0] != 1:
        raise RoutingError(
            f"site {key}: a packed route needs one packed row [1, T, hidden], got an activation of shape "
            f"{tuple(t.shape)}"
        )
    return t.transpose(0, 1)


def from_rows(route_map: RouteMap, rows: torch.Tensor) -> torch.Tensor:
    """Undo :func:`as_rows` on a result computed in the row view."""
    return rows.transpose(0, 1) if route_map.packed else rows


class HookSite(Site):
    """A site read at an entry module's input and written at an exit module's output."""

    def __init__(
        self, key: str, state: State, entry: nn.Module, exit: nn.Module, entry_name: str, exit_name: str
    ):
        super().__init__(key, state)
        self.entry, self.exit = entry, exit
        self.entry_name, self.exit_name = entry_name, exit_name
        self._x: dict[int, torch.Tensor | None] = {}  # per thread: forwards in other threads must not mix
        self.attach_hooks()

    def attach_hooks(self) -> None:
        """Register the entry pre-hook and exit hook (``fuse`` takes them off while they can do nothing)."""
        self._handles.append(self.entry.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(self.exit.register_forward_hook(self._post, with_kwargs=True))

    def _pre(self, module, args, kwargs):
        route_map = self.state.route_map()
        if route_map is None:
            self._x.pop(threading.get_ident(), None)
            return None
        x = _first_arg(args, kwargs)
        xr = as_rows(route_map, x, self.key)
        x2 = xr
        if self.writes_input():
            groups = route_map.groups(_batch(xr), x.device)
            x2 = transform(self, route_map, groups, xr, None, "input") if groups else xr
        self._x[threading.get_ident()] = x2  # kept in row view: the exit transforms in the same view
        if x2 is xr:
            return None
        return _replace_first_arg(args, kwargs, from_rows(route_map, x2))

    def _post(self, module, args, kwargs, output):
        x = self._x.pop(threading.get_ident(), None)
        route_map = self.state.route_map()
        if route_map is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if x is None:
            raise RoutingError(
                f"site {self.key}: exit {self.exit_name} ran without its entry {self.entry_name}"
            )
        hr = as_rows(route_map, h, self.key)
        groups = route_map.groups(_batch(hr), h.device)
        if not groups:
            return None
        h2 = transform(self, route_map, groups, hr, x, "output")
        if h2 is hr:
            return None
        h2 = from_rows(route_map, h2)
        return (h2, *output[1:]) if isinstance(output, tuple) else h2


class BlockSite(HookSite):
    kind = "block"


class LinearSite(HookSite):
    kind = "linear"

    @property
    def module(self) -> nn.Module:
        return self.entry
