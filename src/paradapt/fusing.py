"""Fusing a parallel adapter into its FFN's own projections, for single-adapter inference.

A parallel adapter on the FFN (He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning") adds, to the FFN's output before the
residual and norm,

    delta(x) = s * act_a(x Wd^T + bd) Wu^T + bu        (Wd: [r, d], Wu: [d, r])

and the FFN itself is ``W2 act(W1 x + b1) + b2`` (``W1: [I, d]``, ``W2: [d, I]``).
Both read the same ``x`` and add to the same place, so one FFN with a hidden
layer wider by ``r`` computes their sum:

    W1' = [W1; Wd]      b1' = [b1; bd]       act' = [act on the first I | act_a on the last r]
    W2' = [W2, s Wu]    b2' = b2 + bu

This is the fusion of the FLoRA adapters (Gowda et al. 2025, "FLoRA: Fused
forward-backward adapters for parameter efficient fine-tuning and reducing
inference-time latencies of LLMs"): the adapter's down-projection becomes extra
output rows of the FFN's first projection, its up-projection extra input
columns of the last. It is exact, not an approximation: every output of the
widened first projection is the dot product it was before (base rows) or the
adapter's pre-activation (new rows); the split activation applies each
function to its own slice; and the widened last projection's sum over ``I + r``
inputs is the base sum plus the adapter's ``s Wu a``. Only rounding order
changes. A gated FFN (Llama, Qwen: ``W2 (act(Wg x) * (Wu x))``) gets the
adapter rows on the gate and ``r`` zero rows with bias 1 on the up projection,
so the product passes the adapter slice through unchanged (times exactly 1).

Cost: the unfused adapter is two more (small, skinny) matmuls per FFN plus an
elementwise add, each its own kernel launch, which at decode time costs about
as much as a large matmul. Fused, each projection is still one matmul, ``r``
wider (``r / I`` more FLOPs, e.g. 64 / 11008 = 0.6% on Llama-7B), and the
activation is one full-width call plus one of width ``r`` written into the tail
of its output (see :class:`SplitActivation`). The original MLP forward runs
unchanged on the enlarged weights; no modeling code is copied.

The original ``nn.Parameter`` objects and activation module are kept and put
back by :func:`unfuse`, so the base weights, module tree and state dict are
exactly the original's again. Fusing is for inference: the fused weights are
frozen copies, the adapter's dropout is not applied, and changing the adapter's
weights while fused has no effect until it is fused again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .archmap import Family, is_linear, linear_dims
from .bottleneck import _ACTS, Bottleneck
from .errors import MergeError
from .quantized import is_quantized
from .sites import HookSite
from .state import AdapterRecord, State, require_state

# -- the split activation ----------------------------------------------------------------

# Base activation modules that compute exactly one of the adapter activations.
_SAME = {
    nn.ReLU: ("relu",),
    nn.SiLU: ("silu", "swish"),
    nn.Tanh: ("tanh",),
    nn.Identity: ("identity",),
}


def _same_function(base: Callable, act: str) -> bool:
    """Whether ``base`` and the adapter's ``act`` are the same function (then one call covers both)."""
    if act in _SAME.get(type(base), ()):
        return True
    name = type(base).__name__
    if name == "SiLUActivation":  # transformers' silu: F.silu
        return act in ("silu", "swish")
    if isinstance(base, nn.GELU):
        return act == "gelu" and base.approximate == "none"
    if name == "GELUActivation":  # transformers' exact gelu, unless it uses its Python formula
        return act == "gelu" and getattr(base, "act", None) is torch.nn.functional.gelu
    return False


# The adapter activations of ``_ACTS``, written into a given tensor (``out=``): the same
# functions (aten's relu is ``clamp_min(x, 0)``), with no temporary and no extra copy.
_ACTS_INTO: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
    "relu": lambda x, out: torch.clamp_min(x, 0, out=out),
    "gelu": lambda x, out: torch._C._nn.gelu(x, out=out),
    "silu": lambda x, out: torch._C._nn.silu(x, out=out),
    "swish": lambda x, out: torch._C._nn.silu(x, out=out),
    "tanh": lambda x, out: torch.tanh(x, out=out),
    "identity": lambda x, out: out.copy_(x),
}


class SplitActivation(nn.Module):
    """The base activation on the first ``width`` features, the adapter's on the rest.

    Inference path (autograd not tracking ``h``): the base activation runs once over the
    whole row, then the adapter's activation of ``h``'s last ``r`` features is written
    over the last ``r`` of its output (``out=`` on a narrowed view). One full-width call and
    one of width ``r``, no slice-and-concatenate: at batch-1 decode the concatenation (two
    activations into temporaries, then a fresh output) cost two to three times the base
    activation alone. Elementwise ``out=`` may alias ``h`` (an ``nn.Identity`` base returns
    ``h`` itself), so that case is exact too. When autograd tracks ``h`` (``out=`` has no
    gradient) or the base activation works in place (it would overwrite ``h``'s tail before
    the adapter reads it), the slices are activated apart and concatenated.
    """

    def __init__(self, base: Callable, act: str, width: int):
        super().__init__()
        self.base_act = base  # a child module when it is one, so .to() and repr see it
        self.act = act
        self.width = width
        self.same = _same_function(base, act)
        self.base_inplace = bool(getattr(base, "inplace", False))
        # Plain attributes for the per-call path: a child module is found through
        # nn.Module.__getattr__, which costs about a microsecond per access at decode.
        self.__dict__["_base"] = base

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        base = self._base
        if self.same:
            return base(h)
        i = self.width
        if self.base_inplace or (torch.is_grad_enabled() and h.requires_grad):
            return torch.cat([base(h[..., :i]), _ACTS[self.act](h[..., i:])], dim=-1)
        out = base(h)
        r = h.shape[-1] - i
        _ACTS_INTO[self.act](h.narrow(-1, i, r), out.narrow(-1, i, r))
        return out

    def extra_repr(self) -> str:
        return f"base features={self.width}, adapter act={self.act}, same={self.same}"


# -- what fusing changed, to undo it ---------------------------------------------------------


@dataclass
class _Swap:
    """One attribute replaced while fused, with the original value (Parameter, module or int)."""

    owner: nn.Module
    attr: str
    old: object
    plain: bool  # the original lived in the instance __dict__, not in _parameters / _modules

    def restore(self) -> None:
        cur = getattr(self.owner, self.attr)
        if isinstance(self.old, torch.Tensor) and isinstance(cur, torch.Tensor):
            if self.old.device != cur.device or self.old.dtype != cur.dtype:  # model.to(...) while fused
                self.old.data = self.old.data.to(device=cur.device, dtype=cur.dtype)
        if self.plain:
            self.owner._modules.pop(self.attr, None)
            self.owner._parameters.pop(self.attr, None)
            self.owner.__dict__[self.attr] = self.old
        else:
            setattr(self.owner, self.attr, self.old)


def _replace(owner: nn.Module, attr: str, value: object, swaps: list[_Swap]) -> None:
    registered = attr in owner._parameters or attr in owner._modules or attr in owner._buffers
    swaps.append(_Swap(owner, attr, getattr(owner, attr), plain=not registered))
    setattr(owner, attr, value)


@dataclass
class FusedFFN:
    """One FFN holding the adapter: its layer, the linears it widened and how to undo it."""

    site: str
    layer: str
    linears: tuple[nn.Module, ...]
    swaps: list[_Swap] = field(default_factory=list)
    unhooked: HookSite | None = None  # the FFN's site, its hooks taken off while fused

    def restore(self) -> None:
        for s in reversed(self.swaps):
            s.restore()
        self.swaps.clear()
        if self.unhooked is not None:
            self.unhooked.attach_hooks()
            self.unhooked = None


@dataclass
class Fused:
    """The handle stored in ``AdapterRecord.fused``."""

    name: str
    ffns: list[FusedFFN] = field(default_factory=list)

    def restore(self) -> None:
        for f in reversed(self.ffns):
            f.restore()


# -- checks (all before anything changes) ------------------------------------------------------


@dataclass
class _FuseTarget:
    """One FFN an adapter is about to be fused into, checked: its site, layer, projections, activation."""

    name: str
    site: HookSite
    layer: str
    comp: Bottleneck
    first: tuple[nn.Module, ...]  # (fc,) or (gate, up)
    last: nn.Module
    act_owner: nn.Module
    act_attr: str


def _refuse(name: str, why: str) -> MergeError:
    return MergeError(f"adapter {name!r} cannot be fused: {why}")


def _check_record(st: State, rec: AdapterRecord) -> Family:
    name, cfg = rec.name, rec.config
    if rec.fused is not None:
        raise MergeError(f"adapter {name!r} is already fused")
    if rec.merged:
        raise MergeError(f"adapter {name!r} is merged into the base weights; unmerge it before fusing")
    if cfg.kind != "parallel":
        raise _refuse(name, f"it is a {cfg.kind} adapter; only parallel adapters on the FFN fuse")
    loc = getattr(cfg, "location", "ffn")
    if cfg.targets is None and loc == "attn":
        raise _refuse(name, "it sits on the attention block, which has no hidden layer to widen")
    if cfg.targets is None and loc == "both":
        raise _refuse(
            name, "it has an attention part as well as an FFN part; only location='ffn' adapters fuse"
        )
    fam = st.arch.family
    if fam is None:
        raise _refuse(
            name,
            f"{type(st.model).__name__} matches no known architecture (Llama/Qwen/Mistral, GPT-2, BERT), "
            "so its FFN's projections and activation are unknown",
        )
    return fam


def _check_site(st: State, name: str, key: str, fam: Family) -> _FuseTarget:
    site = st.sites[key]
    comp = site.components[name]
    if site.kind != "block" or not isinstance(comp, Bottleneck):
        raise _refuse(name, f"its component at {key} is not a bottleneck on a block")
    if comp.reads != "input" or comp.writes != "output":
        raise _refuse(name, f"its bottleneck at {key} does not read the block input")
    idx = st.arch.layer_index(site.entry_name)
    layer = st.arch.layers[idx] if idx is not None else None
    if layer is None or (site.entry_name, site.exit_name) != tuple(f"{layer}.{p}" for p in fam.ffn):
        raise _refuse(name, f"{key} ({site.entry_name} -> {site.exit_name}) is not a {fam.name} FFN")
    owner_path, _, attr = f"{layer}.{fam.ffn_act}".rpartition(".")
    owner = st.modules.get(owner_path)
    if owner is None or not hasattr(owner, attr):
        raise _refuse(name, f"{layer} has no FFN activation at {fam.ffn_act}")
    first = tuple(st.modules[f"{layer}.{p}"] for p in fam.ffn_in)
    last = st.modules[f"{layer}.{fam.ffn_out}"]
    if not all(is_linear(m) for m in (*first, last)):
        raise _refuse(name, f"the FFN projections of {layer} are not Linear / Conv1D modules")
    quantised = [m.layer_name for m in (*first, last) if is_quantized(m)]
    if quantised:
        raise _refuse(name, f"base layer {quantised[0]} is quantised; pa.dequantize(model) first")
    return _FuseTarget(name, site, layer, comp, first, last, owner, attr)


def _check_conflicts(st: State, name: str, targets: list[_FuseTarget]) -> None:
    """One fused adapter per FFN; no merged adapter inside the linears about to be widened."""
    layers = {t.layer for t in targets}
    linears = {id(m) for t in targets for m in (*t.first, t.last)}
    for other in st.adapters.values():
        if other.name == name:
            continue
        if other.fused is not None:
            taken = sorted(layers & {f.layer for f in other.fused.ffns})
            if taken:
                raise _refuse(
                    name, f"the FFN of {taken[0]} already holds fused adapter {other.name!r} (one per FFN)"
                )
        elif other.merged:
            for k in other.sites:
                site = st.sites[k]
                if site.kind == "linear" and id(site.module) in linears:
                    raise _refuse(name, f"adapter {other.name!r} is merged into {k}; unmerge it first")


# -- the weight surgery -------------------------------------------------------------------


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _widen_out(mod: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None, swaps: list[_Swap]) -> None:
    """Append output rows (``rows``: [r, d_in] in Linear layout) and their bias (None: zero)."""
    w = mod.weight
    rows = rows.to(device=w.device, dtype=w.dtype)
    conv = not isinstance(mod, nn.Linear)
    new_w = torch.cat([w, rows.T], dim=1) if conv else torch.cat([w, rows], dim=0)
    if bias is not None or mod.bias is not None:
        d_out, r = linear_dims(mod)[1], rows.shape[0]
        base_b = mod.bias if mod.bias is not None else w.new_zeros(d_out)
        extra_b = bias.to(device=w.device, dtype=w.dtype) if bias is not None else w.new_zeros(r)
        _replace(mod, "bias", _param(torch.cat([base_b.detach(), extra_b])), swaps)
    _replace(mod, "weight", _param(new_w.detach()), swaps)
    _replace(mod, "nf" if conv else "out_features", new_w.shape[1 if conv else 0], swaps)


def _widen_in(mod: nn.Module, cols: torch.Tensor, bias: torch.Tensor | None, swaps: list[_Swap]) -> None:
    """Append input columns (``cols``: [d_out, r]) and add ``bias`` to the output bias."""
    w = mod.weight
    cols = cols.to(device=w.device, dtype=w.dtype)
    conv = not isinstance(mod, nn.Linear)
    new_w = torch.cat([w, cols.T], dim=0) if conv else torch.cat([w, cols], dim=1)
    if bias is not None:
        b = mod.bias.detach().float() if mod.bias is not None else 0.0
        _replace(mod, "bias", _param((b + bias.detach().float()).to(device=w.device, dtype=w.dtype)), swaps)
    _replace(mod, "weight", _param(new_w.detach()), swaps)
    _replace(mod, "nx" if conv else "in_features", new_w.shape[0 if conv else 1], swaps)


def _fuse_ffn(p: _FuseTarget) -> FusedFFN:
    comp = p.comp
    out = FusedFFN(p.site.key, p.layer, (*p.first, p.last))
    width = linear_dims(p.first[0])[1]
    wd = comp.down.weight.detach()
    bd = comp.down.bias.detach() if comp.down.bias is not None else None
    wu = comp.up.weight.detach().float() * comp.scale.detach().float()
    bu = comp.up.bias.detach() if comp.up.bias is not None else None
    try:
        _widen_out(p.first[0], wd, bd, out.swaps)
        if len(p.first) == 2:  # gated: the up projection passes the adapter slice through (x 1)
            _widen_out(p.first[1], wd.new_zeros(wd.shape), wd.new_ones(wd.shape[0]), out.swaps)
        base_act = getattr(p.act_owner, p.act_attr)
        _replace(p.act_owner, p.act_attr, SplitActivation(base_act, comp.act_name, width), out.swaps)
        _widen_in(p.last, wu, bu, out.swaps)
    except Exception:
        out.restore()
        raise
    _unhook_if_alone(p, out)
    return out


def _unhook_if_alone(p: _FuseTarget, out: FusedFFN) -> None:
    """Take the FFN site's hooks off while fused, when the fused adapter is all the site holds.

    They could do nothing: while an adapter is fused, activating or routing any adapter is
    refused (it is merged), so no route reaches them. Yet a module with hooks leaves
    ``nn.Module.__call__``'s fast path, which with the hook calls cost tens of microseconds
    per FFN per decode step. Another adapter added to the site while fused cannot be routed
    before ``unfuse``, which puts the hooks back.
    """
    if set(p.site.components) == {p.name}:
        p.site.remove_hooks()
        out.unhooked = p.site


# -- public -------------------------------------------------------------------------------


@torch.no_grad()
def fuse(model: nn.Module, name: str) -> None:
    """Fold parallel adapter ``name`` into its FFNs' projections; the plain forward then applies it.

    Like ``pa.merge`` the adapter then applies to every row and the active
    composition is cleared. Refused (MergeError) for anything but a parallel
    adapter on the FFN, for an adapter already fused or merged, and where
    another fused adapter already sits in the same FFN.
    """
    st = require_state(model)
    rec = st.record(name)
    fam = _check_record(st, rec)
    targets = [_check_site(st, name, k, fam) for k in rec.sites]
    _check_conflicts(st, name, targets)
    handle = Fused(name)
    try:
        for t in targets:
            handle.ffns.append(_fuse_ffn(t))
    except Exception:
        handle.restore()
        raise
    rec.fused = handle
    rec.merged = True
    st.merged.add(name)
    if st.active is not None:
        st.set_active(None)


@torch.no_grad()
def unfuse(model: nn.Module, name: str) -> None:
    """Put the original weights and activations back; the adapter runs unfused again."""
    st = require_state(model)
    rec = st.record(name)
    if rec.fused is None:
        extra = " (it is merged; use pa.unmerge)" if rec.merged else ""
        raise MergeError(f"adapter {name!r} is not fused{extra}")
    rec.fused.restore()
    rec.fused = None
    rec.merged = False
    st.merged.discard(name)


def fused_owner(model_or_state: nn.Module | State, module: nn.Module) -> str | None:
    """The adapter fused into ``module`` (an FFN projection), or None: merging into it must wait."""
    st = model_or_state if isinstance(model_or_state, State) else require_state(model_or_state)
    for rec in st.adapters.values():
        if rec.fused is not None and any(m is module for f in rec.fused.ffns for m in f.linears):
            return rec.name
    return None


def before_add(st: State, name: str, parts: list[tuple[object, nn.Module]]) -> None:
    """Check adapter ``name``'s parts (``(SiteSpec, component)``) against fused FFNs; before attaching.

    A part on an FFN projection that a fused adapter has widened is refused: built there it
    would take its shapes from the widened weight (``I + r``), not the original that
    ``unfuse`` puts back, and a PiSSA LoRA would take its principal part out of the fused copy
    instead of the original. A part on a fused FFN's block site puts that site's hooks back,
    so the new adapter applies wherever a route reaches it.
    """
    for spec, _ in parts:
        if spec.kind == "linear":
            owner = fused_owner(st, st.modules[spec.key])
            if owner is not None:
                raise MergeError(
                    f"adapter {name!r} cannot be added on {spec.key}: adapter {owner!r} is fused into it "
                    f"(the weight is widened by the fused adapter's rank); unfuse {owner!r} first"
                )
    for spec, _ in parts:
        for rec in st.adapters.values():
            for f in rec.fused.ffns if rec.fused is not None else ():
                if f.site == spec.key and f.unhooked is not None:
                    f.unhooked.attach_hooks()
                    f.unhooked = None


def check_removable(st: State, name: str) -> None:
    """Refuse removing a PiSSA LoRA from a projection another adapter is fused into.

    Removing PiSSA adds its principal part back to the base weight; while fused, the
    module holds a widened copy and the original weight is parked until ``unfuse``, so
    the add would miss the original (and not even fit the copy's shape).
    """
    rec = st.record(name)
    for key in rec.sites:
        site = st.sites[key]
        if site.kind != "linear" or getattr(site.components.get(name), "pissa_down0", None) is None:
            continue
        owner = fused_owner(st, site.module)
        if owner is not None and owner != name:
            raise MergeError(
                f"adapter {name!r} cannot be removed from {key} while adapter {owner!r} is fused into it: "
                f"{name!r} is a PiSSA LoRA whose principal part goes back into the original weight; "
                f"unfuse {owner!r} first"
            )
