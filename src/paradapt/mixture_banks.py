"""A learned mixture's experts through a site's banks, for mixed batches at inference.

In a mixed batch (a packed serving step, or rows routed to different adapters) a plain adapter's
rows go through the site's banks (``sites.apply_banks``). A mixture's rows do too: its gate runs
once over the mixture's tokens (one router matmul), then every (token, kept expert) pair becomes
one row of that expert's bank, carrying the gate's weight. The rows of every mixture at a bank
(all their top-k choices at once) are one batched bank call, sorted by slot with tensor ops
(:meth:`banks.Segments.of_slots`); the weighted deltas are summed per token by index. There is no
loop over rows or tokens in Python, only over the banks and the mixtures present.

A mixture goes this way at a site when every expert writing at the site's output is a bankable
bottleneck in eval mode (as a plain adapter's rows would); otherwise, an (IA)^3 or SSF expert
or one in training, its rows take the general path there (``gate.MixtureOp``: each expert as its
own module). Experts writing at the site's input are applied in the input phase, which no bank
serves.

Rounding: a bank computes ``act(x Wd + bd) * s`` before the up-projection and a module after it,
so a mixture's rows through a bank equal the same rows through the experts' modules up to float
rounding, exactly as a plain adapter's banked rows equal that adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .banks import Bank, Segments, bankable
from .gate import MixtureGate, MixtureOp

if TYPE_CHECKING:
    from .routing import Route
    from .sites import Site


Cached = Callable[[tuple, Callable[[], Any]], Any]


@dataclass
class Pending:
    """One mixture group's gate at one site, computed, with its experts' banks."""

    tokens: torch.Tensor  # the group's tokens, as flat indices into the site's [rows * T] view
    g: torch.Tensor  # [m, K] the gate's weight per token and expert
    chosen: torch.Tensor | None  # [m, K] the experts each token kept (None: a dense gate, all)
    experts: list[tuple[int, str, Bank]]  # (index in the gate, expert name, its bank)


def bankable_gate(components: dict, gate: MixtureGate) -> bool:
    """Whether every expert writing at this site's output can be served from a bank."""
    comps = [components[n] for n in gate.experts]
    return all(bankable(c) and not c.training for c in comps if c.writes == "output")


def prepare(
    site: Site, route: Route, rows: torch.Tensor | None, h: torch.Tensor, x: torch.Tensor, check: bool = True
) -> Pending | None:
    """Run the gate of the mixture ``route`` on its ``rows`` (None: all) of ``h``/``x`` (``[N, T, ...]``)
    and put its experts in the site's banks (``check``: as :meth:`Site.bank_for`); None when no
    expert of it writes at the output here.

    The caller has checked :func:`bankable_gate`. Banks are filled here, before any segments of
    the forward are built, so plain rows and mixture rows see the same slots.
    """
    ops = site.ops(route, "output", rows, h.shape[0])
    if not ops:
        return None
    op: MixtureOp = ops[0][0]
    hg = h if rows is None else h.index_select(0, rows)
    xg = x if rows is None else x.index_select(0, rows)
    g, chosen = op.weights(hg, xg)
    lead = hg.shape[:-1]
    k = g.shape[-1]
    g = g.expand(*lead, k).reshape(-1, k)  # a sequence gate's row weights, on each of its tokens
    chosen = None if chosen is None else chosen.expand(*lead, k).reshape(-1, k)
    t = hg[0].numel() // hg.shape[-1] if hg.shape[0] else 1  # tokens per row (1 in a packed step)
    first = torch.arange(h.shape[0], device=h.device) if rows is None else rows.to(h.device)
    tokens = (first[:, None] * t + torch.arange(t, device=h.device)).reshape(-1)
    experts = []
    for i in op.idx:
        name = op.gate.experts[i]
        experts.append((i, name, site.bank_for(name, op.experts[i], h.device, check)))
    return Pending(tokens, g, chosen, experts)


def _rows_for(p: Pending, bank: Bank, cols: list[int], names: list[str], cached: Cached):
    """This mixture's (token, slot, weight) rows for ``bank``: one per token and kept expert."""
    dev = p.g.device
    slot_of = cached(
        ("mixture-slots", bank.layout, tuple(names), dev),
        lambda: torch.tensor([bank.layout.index[n] for n in names], device=dev),
    )
    col = cached(("mixture-cols", tuple(cols), dev), lambda: torch.tensor(cols, device=dev))
    if p.chosen is None:  # dense: every token through every expert, expert-major
        m = p.tokens.shape[0]
        return (
            p.tokens.repeat(len(cols)),
            slot_of.repeat_interleave(m),
            p.g.index_select(1, col).t().reshape(-1),
        )
    pos, j = p.chosen.index_select(1, col).nonzero(as_tuple=True)
    return p.tokens.index_select(0, pos), slot_of.index_select(0, j), p.g[pos, col.index_select(0, j)]


def apply(pending: list[Pending], h: torch.Tensor, x: torch.Tensor, cached: Cached) -> torch.Tensor | None:
    """``sum_i g_i * delta_i`` for every pending mixture's tokens (zero elsewhere), one bank call
    per bank; ``h``/``x`` are the site's output and input (``[N, T, ...]``). None if nothing ran.
    ``cached(key, build)`` keeps the small index tensors for the forward (``RouteMap.cached``):
    every site and layer with the same slots shares them, one host-to-device copy each."""
    by_bank: dict[int, tuple[Bank, list]] = {}
    for p in pending:
        mine: dict[int, tuple[Bank, list[int], list[str]]] = {}
        for i, name, bank in p.experts:
            entry = mine.setdefault(id(bank), (bank, [], []))
            entry[1].append(i)
            entry[2].append(name)
        for key, (bank, cols, names) in mine.items():
            by_bank.setdefault(key, (bank, []))[1].append(_rows_for(p, bank, cols, names, cached))
    n_tok = h.numel() // h.shape[-1]
    acc = None
    for bank, parts in by_bank.values():
        tok, slots, w = (torch.cat(c) if len(c) > 1 else c[0] for c in zip(*parts, strict=True))
        if tok.numel() == 0:  # no token kept an expert of this bank
            continue
        seg = Segments.of_slots(slots)
        tok, w = tok.index_select(0, seg.perm), w.index_select(0, seg.perm)
        src = x if bank.reads == "input" else h
        src = src.reshape(n_tok, src.shape[-1]).index_select(0, tok)
        d = bank.delta(src.unsqueeze(1), seg).squeeze(1)
        d = d * w.unsqueeze(1).to(d.dtype)
        if acc is None:
            acc = d.new_zeros(n_tok, d.shape[-1])
        acc = acc.index_add(0, tok, d.to(acc.dtype))
    return None if acc is None else acc.reshape(*h.shape[:-1], acc.shape[-1])
