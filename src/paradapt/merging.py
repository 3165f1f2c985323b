"""Merging linear adapters into the base weights, and undoing it.

Mergeable: LoRA (``W <- W + s * B A``), (IA)^3 (``W <- diag(l) W`` for output
scaling, ``W <- W diag(l)`` for input scaling) and SSF (``W <- diag(g) W``,
``b <- g * b + shift``). Bottlenecks with a nonlinearity (parallel and series
adapters) and prefixes cannot be merged: there is no weight that equals them.
"""

from __future__ import annotations

import torch
from torch import nn

from .archmap import weight_out_in
from .bottleneck import Bottleneck
from .errors import MergeError
from .scale_shift import ScaleShift
from .sites import Site


def check_mergeable(name: str, kind: str, sites: list[tuple[Site, nn.Module]]) -> None:
    for site, comp in sites:
        if site.kind != "linear" or not getattr(comp, "mergeable", False):
            why = {
                "parallel": "its bottleneck has a nonlinearity",
                "series": "its bottleneck has a nonlinearity",
                "prefix": "prefixes add attention keys, not weights",
                "mam": "it contains a prefix and a nonlinear bottleneck",
                "mixture": "its gate weights depend on each input (merge its experts instead)",
            }.get(kind, f"its component at {site.key} has no weight-space equivalent")
            raise MergeError(
                f"adapter {name!r} ({kind}) cannot be merged: {why}; only lora, ia3 and ssf merge"
            )


def _bias(module: nn.Module, comp: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The module's bias, creating a zero one (remembered, so unmerge removes it) if it has none."""
    if module.bias is None:
        module.bias = nn.Parameter(
            torch.zeros(like.shape[0], dtype=like.dtype, device=like.device), requires_grad=False
        )
        comp.__dict__["_created_bias"] = True
    return module.bias


@torch.no_grad()
def merge_into(module: nn.Module, comp: nn.Module, sign: int) -> None:
    """Fold ``comp`` into ``module``'s weight (sign=+1) or take it back out (sign=-1)."""
    w = weight_out_in(module)
    if isinstance(comp, Bottleneck):
        dw, db = comp.merged_weight_and_bias()
        w.copy_((w.float() + sign * dw.float()).to(w.dtype))
        if db is not None:
            b = _bias(module, comp, w)
            b.copy_((b.float() + sign * db.float()).to(b.dtype))
    elif isinstance(comp, ScaleShift) and comp.writes == "output":
        g = comp.scale.float()
        if sign > 0:
            w.copy_((w.float() * g[:, None]).to(w.dtype))
            if module.bias is not None or comp.shift is not None:
                b = _bias(module, comp, w)
                shift = comp.shift.float() if comp.shift is not None else 0.0
                b.copy_((b.float() * g + shift).to(b.dtype))
        else:
            w.copy_((w.float() / g[:, None]).to(w.dtype))
            if module.bias is not None:
                shift = comp.shift.float() if comp.shift is not None else 0.0
                module.bias.copy_(((module.bias.float() - shift) / g).to(module.bias.dtype))
    elif isinstance(comp, ScaleShift):
        g = comp.scale.float()
        w.copy_((w.float() * g[None, :] if sign > 0 else w.float() / g[None, :]).to(w.dtype))
    else:
        raise MergeError(f"cannot merge {type(comp).__name__}")
    if sign < 0 and comp.__dict__.pop("_created_bias", False):
        module.bias = None
