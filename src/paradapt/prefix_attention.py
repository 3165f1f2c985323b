"""Prefix adapters inside a self-attention's own attention function (``AttentionSite``).

A prefix adds key/value columns, not a delta on a hidden state, so it cannot be a hook
on a module's input or output (``sites.py``). Each self-attention module with prefixes
gets its attention implementation switched to ``"paradapt"`` (on a copy of its config:
that module only, the model's masks are unchanged), registered in transformers' own
``AttentionInterface``. The registered function puts the routed rows' prefix keys and
values in front of the keys, opens the mask for them, and then calls the model's
original attention function (eager, sdpa, flash, ...): no modeling code is copied.

Two layouts of the same computation:

- padded batches: each row's prefixes, padded to the longest, ``[B, Hkv, Pmax, d]``
  with a validity mask per row (:func:`_pad_rows`);
- packed sequences (one ``[1, T]`` row of many requests' tokens): every route's
  prefixes are their own columns of one ``[1, Hkv, P, d]`` block, each visible only to
  that route's tokens (:func:`_packed_columns`). A paged KV cache is updated first
  (``paged_kv.py``), so prefixes never enter the cache.

Both collect each route's prefixes the same way (:func:`_route_prefixes`) and run the
same tail (:meth:`AttentionSite._with_prefixes`, :func:`prefix_mask`): joint prefixes
share the softmax with the keys (Li & Liang 2021); gated ones add
``tanh(g) * softmax(q P_k^T) P_v`` after it (:func:`prefix_only_attention`;
LLaMA-Adapter, Zhang et al. 2023; see ``prefix.py``).
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .errors import RoutingError
from .paged_kv import update_pages
from .routing import Group, RouteMap
from .sites import Site

if TYPE_CHECKING:
    from .state import State

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
        route_map = self.state.route_map()
        if route_map is not None and route_map.packed:
            return self._attend_packed(route_map, fn, additive, query, key, value, attention_mask, kwargs)
        batch = query.shape[0]
        groups = route_map.groups(batch, query.device) if route_map is not None else []
        joint, gated = self._padded(groups, batch) if groups else (None, None)
        return self._with_prefixes(
            fn, additive, query, key, value, attention_mask, kwargs, joint, gated, packed=False
        )

    def _attend_packed(self, route_map, fn, additive, query, key, value, attention_mask, kwargs):
        """Packed prefixes: each request's prefix K/V sit in front of the keys, visible only to its tokens.

        The tokens of a packed ``[1, T]`` row are the route map's rows; every route with prefix
        components owns its own prefix columns, and the mask lets exactly that route's tokens see
        them. A paged KV cache is updated here first (so prefixes never enter the cache), then the
        model's own attention function runs on ``[prefixes; cached + new keys]``; gated prefixes add
        their separate softmax per token afterwards.
        """
        tokens = query.shape[2]
        groups = route_map.groups(tokens, query.device)
        joint, gated = self._packed(route_map, groups, tokens, query.device) if groups else (None, None)
        if joint is None and gated is None:
            return fn(self.module, query, key, value, attention_mask, **kwargs)
        self.refuse_packed(route_map.names())
        key, value = update_pages(self.module, key, value, kwargs)
        return self._with_prefixes(
            fn, additive, query, key, value, attention_mask, kwargs, joint, gated, packed=True
        )

    def _with_prefixes(
        self, fn, additive, query, key, value, attention_mask, kwargs, joint, gated, *, packed: bool
    ):
        """The model's attention with joint prefix columns in front of the keys, plus gated prefixes.

        ``joint`` is ``(pk, pv, visible)`` and ``gated`` ``(pk, pv, visible, gate)`` or None.
        Padded: ``visible`` is ``[B, P]`` and ``gate`` ``[B, H]`` (per row); packed: ``[T, P]``
        and ``[T, H]`` (per token of the one packed row).
        """
        if joint is not None:
            pk, pv, visible = joint
            attention_mask = prefix_mask(
                attention_mask,
                visible,
                query.shape[2],
                key.shape[2],
                causal=self._causal(kwargs),
                additive=additive,
                dtype=query.dtype,
                per_query=packed,
            )
            key, value = _prepend(pk, key), _prepend(pv, value)
        out, weights = fn(self.module, query, key, value, attention_mask, **kwargs)
        if gated is not None:
            pk, pv, visible, gate = gated
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            if packed:  # one row; visible and gate per token
                extra = prefix_only_attention(query, pk, pv, visible[None], scaling, per_query=True)
                weight = torch.tanh(gate)[None, :, :, None]
            else:
                extra = prefix_only_attention(query, pk, pv, visible, scaling)
                weight = torch.tanh(gate)[:, None, :, None]
            out = out + (weight * extra).to(out.dtype)
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

    def _padded(self, groups: list[Group], batch: int):
        """Per-row prefixes padded to a common length: ``(joint, gated)`` for :meth:`_with_prefixes`."""
        joint_parts, gated_parts = [], []
        for g in groups:
            found = _route_prefixes(self, g)
            if found is None:
                continue
            plain, with_gate = found
            if plain is not None:
                joint_parts.append((g.rows, *plain, None))
            if with_gate is not None:
                gated_parts.append((g.rows, *with_gate))
        joint = _pad_rows(joint_parts, batch) if joint_parts else None
        gated = _pad_rows(gated_parts, batch, gates=True) if gated_parts else None
        return joint, gated

    def _packed(self, route_map: RouteMap, groups: list[Group], tokens: int, device):
        """Prefix columns of every route in a packed step: ``(pk [1,Hkv,P,d], pv, visible [T,P])``
        for joint prefixes, plus per-token gates ``[T, H]`` for gated ones; ``None`` when absent.

        Which token sees which column depends only on the route map and the prefix lengths, so it
        is built once per forward and shared by every layer (like ``RouteMap.segments``).
        """
        joint, gated, shape = [], [], []
        for g in groups:
            found = _route_prefixes(self, g)
            if found is None:
                continue
            plain, with_gate = found
            if plain is not None:
                joint.append((g, *plain))
            if with_gate is not None:
                gated.append((g, *with_gate))
            n_plain = plain[0].shape[1] if plain is not None else 0
            n_gated = with_gate[0].shape[1] if with_gate is not None else 0
            shape.append((g.route, n_plain, n_gated))
        if not shape:
            return None, None
        return (
            _packed_columns(route_map, joint, tokens, device, ("joint", tuple(shape))) if joint else None,
            _packed_columns(route_map, gated, tokens, device, ("gated", tuple(shape))) if gated else None,
        )


def _route_prefixes(site: AttentionSite, g: Group):
    """One route's prefixes at ``site``: ``(joint, gated)``, or None when it has none here.

    ``joint`` is its plain prefixes concatenated along P, ``(k, v)`` each ``[Hkv, P, d]``, or
    None; ``gated`` is its one gated prefix ``(k, v, gate)``, or None. The checks are the
    same for padded and packed batches: an average of prefixes is not defined, and a row
    takes at most one gated prefix (one gate per head).
    """
    comps = [c for c, _ in site.ops(g.route, "attention")]
    if not comps:
        return None
    if g.route.mode == "average":
        raise RoutingError(f"Average over prefix adapters {list(g.route.names)} is not defined; use Stack")
    plain = [c.kv() for c in comps if c.gate is None]
    with_gate = [c for c in comps if c.gate is not None]
    if len(with_gate) > 1:
        raise RoutingError(f"at most one gated prefix per row, got {list(g.route.names)}")
    joint = (torch.cat([k for k, _ in plain], 1), torch.cat([v for _, v in plain], 1)) if plain else None
    gated = (*with_gate[0].kv(), with_gate[0].gate) if with_gate else None
    return joint, gated


def _packed_columns(route_map: RouteMap, parts: list, tokens: int, device, key: tuple):
    """Concatenate the routes' prefixes ``(group, k [Hkv,P,d], v[, gate])`` along P into one block;
    ``visible[t, p]`` says whether token ``t``'s route owns column ``p`` (cached on the route map).

    For gated parts, also each token's gate ``[T, H]`` (zeros for tokens without a gated prefix).
    """
    pk = torch.cat([p[1] for p in parts], 1)[None]
    pv = torch.cat([p[2] for p in parts], 1)[None]

    def build_visible() -> torch.Tensor:
        visible = torch.zeros(tokens, pk.shape[2], dtype=torch.bool, device=device)
        start = 0
        for p in parts:
            g, n = p[0], p[1].shape[1]
            if g.whole:
                visible[:, start : start + n] = True
            else:
                visible[g.rows, start : start + n] = True
            start += n
        return visible

    visible = route_map.cached(("prefix", tokens, device, key), build_visible)
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


# -- the attention math ----------------------------------------------------------------


def prefix_mask(
    mask: torch.Tensor | None,
    visible: torch.Tensor,
    q_len: int,
    kv_len: int,
    causal: bool,
    additive: bool,
    dtype: torch.dtype,
    *,
    per_query: bool = False,
) -> torch.Tensor:
    """The attention mask with ``P`` prefix columns in front, open where ``visible`` says.

    ``visible`` is ``[B, P]`` (one prefix set per batch row), or with ``per_query`` ``[T, P]``:
    the tokens of one packed row belong to different requests, so each query token sees only
    its own request's prefix columns. ``mask`` is whatever the model built (None, a boolean
    mask, or an additive float mask); the result keeps its format so the model's own attention
    function reads it as before.
    """
    batch, device = (1 if per_query else visible.shape[0]), visible.device
    if mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        if causal and q_len > 1:
            allowed = allowed.tril(diagonal=kv_len - q_len)
        mask = allowed[None, None].expand(batch, 1, q_len, kv_len)
        if additive:
            mask = torch.zeros((), dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    if per_query:
        pre = visible[None, None].expand(mask.shape[0], mask.shape[1], q_len, visible.shape[1])
    else:
        if mask.shape[0] != batch:
            mask = mask.expand(batch, *mask.shape[1:])
        pre = visible[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], visible.shape[1])
    if mask.dtype != torch.bool:
        pre = torch.zeros((), dtype=mask.dtype, device=device).masked_fill(~pre, torch.finfo(mask.dtype).min)
    return torch.cat([pre, mask], dim=-1)


def prefix_only_attention(
    query: torch.Tensor,
    pk: torch.Tensor,
    pv: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    per_query: bool = False,
) -> torch.Tensor:
    """``softmax(q P_k^T * scaling) P_v`` over valid prefix slots; rows with none give zeros.

    query ``[B, H, q, d]``, pk/pv ``[B, Hkv, P, d]``, valid ``[B, P]`` (``[B, q, P]`` with
    ``per_query``: a packed row, whose tokens see different prefixes); returns ``[B, q, H, d]``
    (the layout the model's attention functions return).
    """
    rep = query.shape[1] // pk.shape[1]
    if rep > 1:
        pk, pv = pk.repeat_interleave(rep, dim=1), pv.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, pk.transpose(-1, -2).to(query.dtype)) * scaling
    allowed = valid[:, None, :, :] if per_query else valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
    return torch.matmul(probs, pv.to(query.dtype)).transpose(1, 2)
