"""Sites: the places in a frozen model where adapter deltas are added.

Three kinds, each attached with hooks on the *original* modules, so the base
model's module tree and state-dict keys never change and ``unwrap`` restores it
exactly:

- ``BlockSite``: a block (FFN or attention) given by an *entry* module, whose
  input ``x`` it reads, and an *exit* module, whose output ``h`` (before the
  residual add and norm) it changes. For Llama and GPT-2 entry and exit are the
  same module (``mlp``); BERT's FFN spans ``intermediate`` and ``output.dense``
  (the residual and LayerNorm sit inside ``output``), so the parallel adapter
  still adds before that norm, as He et al. define it.
- ``LinearSite``: one linear (or GPT-2 ``Conv1D``); entry and exit are the same
  module. Components here may be merged into its weight.
- ``AttentionSite``: the attention function of one self-attention module, for
  prefixes. Hooked through transformers' own ``AttentionInterface`` registry.

Every component exposes ``delta(src)``; a site computes ``h <- h + delta`` for
the rows each route of the current :class:`~paradapt.routing.Plan` covers.
"""

from __future__ import annotations

import copy
import sys
import threading
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import prefix as prefix_math
from .banks import Bank, bankable, signature
from .errors import RoutingError
from .routing import Group, Plan, Route, single_name

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
        self._bank_lock = threading.Lock()
        self._handles: list = []

    # copies (deepcopy, pickle) leave the banks behind: they are a cache, rebuilt on first use
    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d.update(banks={}, _bank_of={}, _bank_lock=None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._bank_lock = threading.Lock()

    def unbank(self, name: str) -> None:
        """Free an adapter's bank slot (it is refilled from its parameters when next banked)."""
        if name in self._bank_of:
            with self._bank_lock:
                bank = self._bank_of.pop(name, None)
                if bank is not None:
                    bank.remove(name)

    def drop(self, name: str) -> nn.Module:
        """Take an adapter's component (and its bank slot) out of this site."""
        self.unbank(name)
        return self.components.pop(name)

    def bank_for(self, name: str, comp: nn.Module, device: torch.device) -> Bank:
        """The bank holding ``name``'s current weights on ``device`` (inserting or recopying as needed)."""
        bank = self._bank_of.get(name)
        if bank is not None and bank.device == device and bank.fresh(name, comp):
            return bank
        with self._bank_lock:  # forwards in several threads may fill the same bank
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

    def ops(self, route: Route, writes: str) -> list[tuple[nn.Module, float]]:
        """The components this route applies here, in order, with their weights."""
        out = []
        merged = self.state.merged
        for i, name in enumerate(route.names):
            c = self.components.get(name)
            if c is not None and c.writes == writes and name not in merged:
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
            src = x if (c.reads == "input" and c.writes == "output") else h
            h = h + c.delta(src).to(h.dtype)
        return h
    acc = None
    for c, w in ops:
        src = x if (c.reads == "input" and c.writes == "output") else h
        d = c.delta(src) * w
        acc = d if acc is None else acc + d
    return h if acc is None else h + acc.to(h.dtype)


def apply_banks(
    site: Site, plan: Plan, groups: list[Group], h: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, list[Group]]:
    """Add every one-adapter row's bottleneck delta through the site's banks, in one pass per bank.

    Returns the new ``h`` and the groups still to do the general way (compositions,
    non-bottleneck components, adapters in training mode).
    """
    rest, used = [], {}
    merged = site.state.merged
    for g in groups:
        name = single_name(g.route)
        comp = site.components.get(name) if name is not None else None
        if name is not None and (comp is None or name in merged):
            continue  # nothing of this adapter here
        if comp is None or not bankable(comp) or comp.training:
            if name is not None:
                site.unbank(name)  # else its slot would still match these rows' segments
            rest.append(g)
            continue
        bank = site.bank_for(name, comp, h.device)
        used[id(bank)] = bank
    batch = h.shape[0]
    out = h
    for bank in used.values():
        seg = plan.segments(bank.layout, batch, h.device)
        if seg is None:
            continue
        src = x if bank.reads == "input" else h
        if seg.perm is not None:
            src = src.index_select(0, seg.perm)
        d = bank.delta(src.reshape(src.shape[0], -1, src.shape[-1]), seg)
        d = d.reshape(d.shape[0], *h.shape[1:-1], d.shape[-1]).to(h.dtype)
        out = out + d if seg.perm is None else out.index_add(0, seg.perm, d)
    return out, rest


def transform(
    site: Site, plan: Plan, groups: list[Group], h: torch.Tensor, x: torch.Tensor | None, writes: str
) -> torch.Tensor:
    """Apply each group's route to its rows; rows of no group pass through unchanged.

    Mixed batches at inference (no autograd) go through the site's banks; training
    and compositions take the per-group path, which autograd sees through.
    """
    if len(groups) == 1 and groups[0].whole:
        ops = site.ops(groups[0].route, writes)
        return run_ops(ops, groups[0].route.mode, h, x) if ops else h
    if writes == "output" and not torch.is_grad_enabled():
        h, groups = apply_banks(site, plan, groups, h, x)
    out = None
    for g in groups:
        ops = site.ops(g.route, writes)
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


def as_rows(plan: Plan, t: torch.Tensor, key: str) -> torch.Tensor:
    """The rows a plan routes: the batch rows, or for a packed plan the tokens of ``[1, T, ...]``.

    The packed view is ``t.transpose(0, 1)`` (``[T, 1, ...]``), free since the batch is one row,
    so groups, segments and banks see tokens exactly as they see rows of a padded batch.
    """
    if not plan.packed:
        return t
    if t.dim() < 3 or t.shape[0] != 1:
        raise RoutingError(
            f"site {key}: a packed route needs one packed row [1, T, hidden], got an activation of shape "
            f"{tuple(t.shape)}"
        )
    return t.transpose(0, 1)


def from_rows(plan: Plan, rows: torch.Tensor) -> torch.Tensor:
    """Undo :func:`as_rows` on a result computed in the row view."""
    return rows.transpose(0, 1) if plan.packed else rows


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
        plan = self.state.plan()
        if plan is None:
            self._x.pop(threading.get_ident(), None)
            return None
        x = _first_arg(args, kwargs)
        xr = as_rows(plan, x, self.key)
        groups = plan.groups(_batch(xr), x.device)
        x2 = transform(self, plan, groups, xr, None, "input") if groups else xr
        self._x[threading.get_ident()] = x2  # kept in row view: the exit transforms in the same view
        if x2 is xr:
            return None
        return _replace_first_arg(args, kwargs, from_rows(plan, x2))

    def _post(self, module, args, kwargs, output):
        x = self._x.pop(threading.get_ident(), None)
        plan = self.state.plan()
        if plan is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if x is None:
            raise RoutingError(
                f"site {self.key}: exit {self.exit_name} ran without its entry {self.entry_name}"
            )
        hr = as_rows(plan, h, self.key)
        groups = plan.groups(_batch(hr), h.device)
        if not groups:
            return None
        h2 = transform(self, plan, groups, hr, x, "output")
        if h2 is hr:
            return None
        h2 = from_rows(plan, h2)
        return (h2, *output[1:]) if isinstance(output, tuple) else h2


class BlockSite(HookSite):
    kind = "block"


class LinearSite(HookSite):
    kind = "linear"

    @property
    def module(self) -> nn.Module:
        return self.entry


# -- attention --------------------------------------------------------------------------

IMPL = "paradapt"


def _paradapt_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered in transformers' AttentionInterface; delegates to the module's site."""
    return module.__dict__["_paradapt_site"].attend(query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPL, _paradapt_attention)


class AttentionSite(Site):
    """Prefixes at one self-attention module, applied inside its attention function."""

    kind = "attention"

    def __init__(self, key: str, state: State, module: nn.Module):
        super().__init__(key, state)
        self.module = module
        self.original_config = module.config
        cfg = copy.copy(module.config)
        cfg.__dict__["_attn_implementation_internal"] = IMPL  # this module only; masks stay the model's
        module.config = cfg
        module.__dict__["_paradapt_site"] = self

    def remove_hooks(self) -> None:
        self.module.config = self.original_config
        self.module.__dict__.pop("_paradapt_site", None)

    def _original(self):
        impl = self.original_config._attn_implementation or "eager"
        default = getattr(sys.modules[type(self.module).__module__], "eager_attention_forward", None)
        if impl == "eager":
            if default is None:
                raise RoutingError(
                    f"{self.key}: no eager attention function found for {type(self.module).__name__}"
                )
            return default, True
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, default), False

    def attend(self, query, key, value, attention_mask, **kwargs):
        fn, additive = self._original()
        plan = self.state.plan()
        if plan is not None and plan.packed:
            return self._attend_packed(plan, fn, additive, query, key, value, attention_mask, kwargs)
        groups = plan.groups(query.shape[0], query.device) if plan is not None else []
        joint, gated = self._gather(groups, query.shape[0], query.dtype) if groups else (None, None)
        if joint is not None:
            pk, pv, valid = joint
            attention_mask = prefix_math.joint_mask(
                attention_mask,
                valid,
                query.shape[2],
                key.shape[2],
                causal=self._causal(kwargs),
                additive=additive,
                dtype=query.dtype,
            )
            key, value = _prepend(pk, key), _prepend(pv, value)
        out, weights = fn(self.module, query, key, value, attention_mask, **kwargs)
        if gated is not None:
            pk, pv, valid, gate = gated
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            extra = prefix_math.prefix_only_attention(query, pk, pv, valid, scaling)
            out = out + (torch.tanh(gate)[:, None, :, None] * extra).to(out.dtype)
        return out, weights

    def _causal(self, kwargs) -> bool:
        """Whether this attention call is causal (the module's flag, unless the call turns it off)."""
        return getattr(self.module, "is_causal", True) and kwargs.get("is_causal", True) is not False

    def refuse_packed(self, names) -> None:
        """Packed prefixes need a mask-based attention (sdpa, eager): name the adapter otherwise."""
        impl = self.original_config._attn_implementation or "eager"
        if impl.split("|")[-1] in ("sdpa", "eager"):
            return
        for n in sorted(set(names) & self.components.keys()):
            if n not in self.state.merged:
                raise RoutingError(
                    f"adapter {n!r} has prefix (attention) components; under packed per-token routing they "
                    f"need the model's attention to be 'sdpa' or 'eager' (a mask), not {impl!r}"
                )

    def _attend_packed(self, plan, fn, additive, query, key, value, attention_mask, kwargs):
        """Packed prefixes: each request's prefix K/V sit in front of the keys, visible only to its tokens.

        The tokens of a packed ``[1, T]`` row are the plan's rows; every route with prefix components
        owns its own prefix columns, and the mask lets exactly that route's tokens see them. A paged
        KV cache is updated here first (so prefixes never enter the cache), then the model's own
        attention function runs on ``[prefixes; cached + new keys]``; gated prefixes add their
        separate softmax per token afterwards.
        """
        tokens = query.shape[2]
        groups = plan.groups(tokens, query.device)
        joint, gated = self._packed_parts(plan, groups, tokens, query.device) if groups else (None, None)
        if joint is None and gated is None:
            return fn(self.module, query, key, value, attention_mask, **kwargs)
        self.refuse_packed(plan.names())
        cache = kwargs.pop("cache", None)
        if cache is not None:  # write the new K/V into the pages and read the request's whole K/V back
            key, value = cache.update(
                key_states=key, value_states=value, layer_idx=self.module.layer_idx, kwargs=kwargs
            )
        if joint is not None:
            pk, pv, visible = joint
            attention_mask = prefix_math.packed_mask(
                attention_mask,
                visible,
                key.shape[2],
                causal=self._causal(kwargs),
                additive=additive,
                dtype=query.dtype,
            )
            key, value = _prepend(pk, key), _prepend(pv, value)
        out, weights = fn(self.module, query, key, value, attention_mask, **kwargs)
        if gated is not None:
            pk, pv, visible, gate = gated
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            extra = prefix_math.prefix_only_attention(query, pk, pv, visible[None], scaling, per_query=True)
            out = out + (torch.tanh(gate)[None, :, :, None] * extra).to(out.dtype)
        return out, weights

    def _packed_parts(self, plan, groups: list[Group], tokens: int, device):
        """Prefix columns of every route in a packed step: ``(pk [1,Hkv,P,d], pv, visible [T,P])``
        for joint prefixes, plus per-token gates ``[T, H]`` for gated ones; ``None`` when absent.

        Which token sees which column depends only on the plan and the prefix lengths, so it is
        built once per forward and shared by every layer (``plan.segments``-style caching).
        """
        joint, gated, shape = [], [], []
        for g in groups:
            comps = [c for c, _ in self.ops(g.route, "attention")]
            if not comps:
                continue
            if g.route.mode == "average":
                raise RoutingError(
                    f"Average over prefix adapters {list(g.route.names)} is not defined; use Stack"
                )
            plain = [c.kv() for c in comps if c.gate is None]
            with_gate = [c for c in comps if c.gate is not None]
            if len(with_gate) > 1:
                raise RoutingError(f"at most one gated prefix per row, got {list(g.route.names)}")
            if plain:
                k, v = torch.cat([k for k, _ in plain], 1), torch.cat([v for _, v in plain], 1)
                joint.append((g, k, v))
            if with_gate:
                k, v = with_gate[0].kv()
                gated.append((g, k, v, with_gate[0].gate))
            shape.append(
                (g.route, sum(k.shape[1] for k, _ in plain), with_gate[0].num_tokens if with_gate else 0)
            )
        if not shape:
            return None, None
        return (
            _packed_columns(plan, joint, tokens, device, ("joint", tuple(shape))) if joint else None,
            _packed_columns(plan, gated, tokens, device, ("gated", tuple(shape))) if gated else None,
        )

    def _gather(self, groups: list[Group], batch: int, dtype):
        """Per-row prefixes padded to a common length, split into joint and gated ones."""
        joint_parts, gated_parts = [], []
        for g in groups:
            comps = [c for c, _ in self.ops(g.route, "attention")]
            if not comps:
                continue
            if g.route.mode == "average":
                raise RoutingError(
                    f"Average over prefix adapters {list(g.route.names)} is not defined; use Stack"
                )
            plain = [c.kv() for c in comps if c.gate is None]
            if plain:
                joint_parts.append(
                    (g.rows, torch.cat([k for k, _ in plain], 1), torch.cat([v for _, v in plain], 1), None)
                )
            with_gate = [c for c in comps if c.gate is not None]
            if len(with_gate) > 1:
                raise RoutingError(f"at most one gated prefix per row, got {[n for n in g.route.names]}")
            if with_gate:
                k, v = with_gate[0].kv()
                gated_parts.append((g.rows, k, v, with_gate[0].gate))
        joint = _pad_rows(joint_parts, batch) if joint_parts else None
        gated = _pad_rows(gated_parts, batch, gates=True) if gated_parts else None
        return joint, gated


def _packed_columns(plan: Plan, parts: list, tokens: int, device, key: tuple):
    """Concatenate the routes' prefixes ``(group, k [Hkv,P,d], v[, gate])`` along P into one block;
    ``visible[t, p]`` says whether token ``t``'s route owns column ``p`` (cached on the plan).

    For gated parts, also each token's gate ``[T, H]`` (zeros for tokens without a gated prefix).
    """
    pk = torch.cat([p[1] for p in parts], 1)[None]
    pv = torch.cat([p[2] for p in parts], 1)[None]
    cache_key = ("prefix", tokens, device, key)
    visible = plan._cache.get(cache_key)
    if visible is None:
        visible = torch.zeros(tokens, pk.shape[2], dtype=torch.bool, device=device)
        start = 0
        for p in parts:
            g, n = p[0], p[1].shape[1]
            if g.whole:
                visible[:, start : start + n] = True
            else:
                visible[g.rows, start : start + n] = True
            start += n
        plan._cache[cache_key] = visible
    if len(parts[0]) == 3:
        return pk, pv, visible
    gate = pk.new_zeros(tokens, parts[0][3].shape[0])
    for g, _, _, gt in parts:
        if g.whole:
            gate[:] = gt
        else:
            gate[g.rows] = gt.to(gate.dtype)
    return pk, pv, visible, gate


def _pad_rows(parts: list, batch: int, gates: bool = False):
    """Stack ``(rows, k [Hkv,P,d], v, gate)`` parts into ``[B, Hkv, Pmax, d]`` with a validity mask."""
    k0 = parts[0][1]
    if len(parts) == 1 and parts[0][0] is None:
        rows, k, v, gate = parts[0]
        valid = torch.ones(batch, k.shape[1], dtype=torch.bool, device=k.device)
        out = (k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1), valid)
        return (*out, gate.unsqueeze(0).expand(batch, -1)) if gates else out
    pmax = max(p[1].shape[1] for p in parts)
    hkv, d = k0.shape[0], k0.shape[2]
    pk = k0.new_zeros(batch, hkv, pmax, d)
    pv = k0.new_zeros(batch, hkv, pmax, d)
    valid = torch.zeros(batch, pmax, dtype=torch.bool, device=k0.device)
    g_all = k0.new_zeros(batch, parts[0][3].shape[0]) if gates else None
    for rows, k, v, gate in parts:
        p = k.shape[1]
        pk[rows, :, :p] = k.unsqueeze(0).expand(len(rows), -1, -1, -1)
        pv[rows, :, :p] = v.unsqueeze(0).expand(len(rows), -1, -1, -1)
        valid[rows, :p] = True
        if gates:
            g_all[rows] = gate.unsqueeze(0).expand(len(rows), -1)
    return (pk, pv, valid, g_all) if gates else (pk, pv, valid)


def _prepend(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Prefix keys or values in front of the attention's own (``[B, H, P + S, d]``)."""
    return torch.cat([prefix.to(states.dtype), states], dim=2)
