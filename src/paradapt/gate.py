"""The gate of a learned mixture at one site: a router and how its weights blend the experts.

A mixture (``config.Mixture``) is ``Average`` with input-dependent weights. At every site
where its experts have components, a :class:`MixtureGate` (the mixture's component there)
holds a linear router ``d_in -> K`` on the site's input. Per token (or per row, pooled over
its tokens) the gate is ``softmax(logits)``, or with ``1 < top_k < K`` the softmax over the
``top_k`` largest logits only (Mixtral's: the others get weight exactly 0, the kept weights sum
to 1). With ``top_k = 1`` the one kept expert gets its own softmax probability (the Switch
Transformer's router, Fedus et al. 2021): renormalised it would always weigh 1, and the task
loss would never reach the router.
The site then adds ``sum_i g_i * delta_i(src_i)``, each expert reading what it reads alone.

Everything is batched over rows and tokens: one router matmul and one softmax per site, then
one weighted delta per expert present there. A dense gate runs every expert on every token
the mixture covers; with ``top_k < K`` each expert runs only on the tokens that kept it
(gathered into one matrix, added back by index: Switch/Mixtral-style dispatch), so top-1 over K
experts costs about one expert, not K. The experts' weights are not part of the gate: it finds them by name on the site at
each forward, so they are saved, counted and trained as the adapters they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MixtureGate(nn.Module):
    """One mixture's router at one site, over the experts present there (in the mixture's order)."""

    reads = "input"
    writes = "mixture"  # neither phase alone: :meth:`op` picks the experts writing in each

    def __init__(self, d_in: int, experts: tuple[str, ...], top_k: int | None, granularity: str):
        super().__init__()
        self.experts = tuple(experts)
        self.top_k = len(self.experts) if top_k is None else min(top_k, len(self.experts))
        self.granularity = granularity
        self.router = nn.Linear(d_in, len(self.experts))

    def logits(self, src: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits in float32, ``[..., K]``; for ``sequence``, one per row (``[N, 1, K]``).

        A sequence gate averages the logits of a row's tokens; with the forward's padding
        ``mask`` (``[N, >= T]``, its last ``T`` columns are these tokens) only the real ones,
        so a padded row gets the gate it gets alone.
        """
        out = self.router(src.to(self.router.weight.dtype)).float()
        if self.granularity != "sequence" or out.dim() != 3:
            return out
        t = out.shape[1]
        if mask is None or mask.shape[0] != out.shape[0] or mask.shape[1] < t:
            w = out.new_ones(out.shape[0], t, 1)
        else:
            w = mask[:, -t:].to(device=out.device, dtype=out.dtype).unsqueeze(-1)
        return (out * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)

    def weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(gate, chosen)``: the gate ``[..., K]`` and, with top-k, the boolean mask of the kept experts.

        Ties (a zero-initialised router) keep the lowest-indexed experts: a stable sort, so the
        choice never depends on the kernel. ``top_k = 1`` keeps the expert's softmax probability
        (Switch), more keep the softmax over the kept logits (Mixtral); see the module doc.
        """
        k = self.top_k
        if k >= logits.shape[-1]:
            return logits.softmax(-1), None
        idx = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        if k == 1:
            return logits.softmax(-1).masked_fill(~chosen, 0.0), chosen
        return logits.masked_fill(~chosen, float("-inf")).softmax(-1), chosen

    def balance_loss(self, logits: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
        """Switch Transformer's load-balancing term (Fedus et al. 2021): ``K * sum_i f_i * P_i``.

        ``f_i``: the share of tokens (rows, for ``sequence``) sent to expert ``i`` (with top-k,
        of the k choices per token; without, of the argmax); ``P_i``: the mean router
        probability of expert ``i``. It is 1 at a perfectly balanced gate and K at a collapsed
        one; gradients flow through ``P`` only.
        """
        flat = logits.reshape(-1, logits.shape[-1])
        probs = flat.softmax(-1)
        k = logits.shape[-1]
        if chosen is None:
            chosen_flat = torch.zeros_like(flat, dtype=torch.bool).scatter_(
                -1, flat.argmax(-1, keepdim=True), True
            )
            per = 1
        else:
            chosen_flat = chosen.reshape(-1, k)
            per = self.top_k
        f = chosen_flat.float().mean(0) / per
        return k * (f * probs.mean(0)).sum()

    def op(
        self,
        components: dict[str, nn.Module],
        writes: str,
        record: Callable | None,
        mask: torch.Tensor | Callable[[], torch.Tensor | None] | None = None,
    ) -> MixtureOp | None:
        """What this gate adds in one phase of its site (``writes``), or None if no expert writes there.

        ``mask`` may be a callable, called only when some expert writes in this phase (a site
        asks every gate in both of its phases; the padding mask costs an ``index_select``)."""
        experts = [components[n] for n in self.experts]
        idx = [i for i, c in enumerate(experts) if c.writes == writes]
        if not idx:
            return None
        return MixtureOp(self, experts, idx, writes, record, mask() if callable(mask) else mask)

    def extra_repr(self) -> str:
        return f"experts={list(self.experts)}, top_k={self.top_k}, granularity={self.granularity}"


class MixtureOp:
    """A gate bound to its site's expert components for one phase; ``sites.run_ops`` applies it."""

    __slots__ = ("gate", "experts", "idx", "writes", "record", "mask")

    def __init__(
        self, gate: MixtureGate, experts: list[nn.Module], idx: list[int], writes: str, record, mask
    ):
        self.gate, self.experts, self.idx, self.writes = gate, experts, idx, writes
        self.record, self.mask = record, mask

    def weights(self, h: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gate over ``h``'s tokens and, with top-k, the kept experts (``MixtureGate.weights``;
        a sequence gate's are one per row, ``[N, 1, K]``). The router reads the site's input
        (``h`` itself in the input phase); the balance loss is recorded when autograd is on."""
        logits = self.gate.logits(h if x is None or self.writes == "input" else x, self.mask)
        g, chosen = self.gate.weights(logits)
        if self.record is not None and torch.is_grad_enabled():
            self.record(self.gate.balance_loss(logits, chosen))
        return g, chosen

    def delta(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """``sum_i g_i * delta_i``, each expert reading its own source as it would alone (each
        expert's own module; ``mixture_banks`` computes the same sum through a site's banks)."""
        g, chosen = self.weights(h, x)
        if chosen is None:
            return self._dense(h, x, g)
        return self._sparse(h, x, g, chosen.expand(*h.shape[:-1], chosen.shape[-1]))

    def _source(self, c: nn.Module, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        return x if (c.reads == "input" and c.writes == "output" and x is not None) else h

    def _dense(self, h: torch.Tensor, x: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted (a softmax gate keeps them all)."""
        acc = None
        for i in self.idx:
            c = self.experts[i]
            d = c.delta(self._source(c, h, x))
            d = d * g[..., i : i + 1].to(d.dtype)
            acc = d if acc is None else acc + d
        return acc

    def _sparse(
        self, h: torch.Tensor, x: torch.Tensor | None, g: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        """Each expert only on the tokens whose top-k kept it (the MoE dispatch): with
        ``top_k = 1`` of K experts a token costs one expert's delta, not K. The gathered tokens
        are rows of one matrix; the weighted deltas are added back at their positions."""
        lead = h.shape[:-1]
        picked = chosen.reshape(-1, chosen.shape[-1])
        weights = g.expand(*lead, g.shape[-1]).reshape(-1, g.shape[-1])
        acc = None
        for i in self.idx:
            rows = picked[:, i].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            c = self.experts[i]
            src = self._source(c, h, x)
            d = c.delta(src.reshape(-1, src.shape[-1]).index_select(0, rows))
            d = d * weights.index_select(0, rows)[:, i : i + 1].to(d.dtype)
            if acc is None:
                acc = d.new_zeros(picked.shape[0], d.shape[-1])
            acc = acc.index_add(0, rows, d)
        if acc is None:  # no token kept an expert writing in this phase
            return h.new_zeros(()).expand_as(h)
        return acc.reshape(*lead, acc.shape[-1])
