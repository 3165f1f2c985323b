"""An adapter's life on a model, as the public functions: add, activate, route, merge, fold,
remove, unwrap, count (``pa.add_adapter``, ``pa.route``, ...; fusing is ``fusing.py``, files
are ``io.py``).

Nothing here flips ``requires_grad`` behind the user's back: the base model is
frozen once, when its first adapter is added (``freeze_base=True``), adapters
are trainable when added and frozen when loaded unless asked otherwise, and
activating or routing never changes either. ``set_trainable`` is the one switch (besides
``add_mixture`` applying its config's explicit ``train_experts`` to the experts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import inject, mixture
from .config import AdapterConfig, Mixture
from .errors import AdapterExistsError, ConfigError, MergeError, RoutingError
from .fusing import before_add, check_removable, fused_owner, unfuse
from .merging import check_mergeable, merge_into
from .quantized import is_quantized
from .routing import Parallel, RouteMap, normalize
from .state import CONTAINER, State, _ChannelRouteMap, _repeat, get_state, require_state

MAX_NAME = 128  # a folder name on every filesystem (255 bytes), with room to spare
_NAME = re.compile(r"[A-Za-z0-9_\-]+\Z")  # \Z, not $: "$" also matches before a final newline


def check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        shown = name if not isinstance(name, str) or len(name) <= 40 else f"{name[:40]}..."
        raise ConfigError("name", f"adapter names use letters, digits, '_' and '-' only, got {shown!r}")
    if len(name) > MAX_NAME:
        raise ConfigError("name", f"adapter names are at most {MAX_NAME} characters, got {len(name)}")


def add_adapter(
    model: nn.Module, name: str, config: AdapterConfig, *, trainable: bool = True, freeze_base: bool = True
) -> nn.Module:
    """Add a new adapter ``name`` built from ``config``; returns its weights module.

    On any error the model is left exactly as it was.
    """
    check_name(name)
    if isinstance(config, Mixture):
        raise ConfigError("config", "a Mixture is added with pa.add_mixture(model, name, mixture)")
    if not isinstance(config, AdapterConfig):
        raise ConfigError(
            "config",
            f"expected a paradapt config (ParallelConfig, LoRAConfig, ...), got {type(config).__name__}",
        )
    return _add(model, name, config, trainable=trainable, freeze_base=freeze_base)


def add_mixture(model: nn.Module, name: str, config: Mixture, *, trainable: bool = True) -> nn.Module:
    """Add a learned mixture ``name`` over adapters already on the model; returns its weights module.

    Its routers are new and trainable (``trainable=True``); the experts' ``requires_grad``
    changes only as ``config.train_experts`` asks (``None``: left as they are; loading a
    mixture's folder never changes its experts). Afterwards the mixture is used like any
    adapter (``set_active``, ``route``, ``save_adapter``, ...). On any error the model is left
    exactly as it was. See docs/mixtures.md.
    """
    check_name(name)
    if not isinstance(config, Mixture):
        raise ConfigError("config", f"expected a pa.Mixture(experts=[...]), got {type(config).__name__}")
    require_state(model)  # its experts are on the model already
    adapter = _add(model, name, config, trainable=trainable)
    mixture.set_experts_trainable(require_state(model), config)
    return adapter


def _add(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    *,
    trainable: bool,
    freeze_base: bool = True,
    before: Callable[[State], None] | None = None,
    after: Callable[[nn.Module], None] | None = None,
    taken_hint: str = "remove it first or pick another name",
    initialise: bool = True,
) -> nn.Module:
    """Build, validate and attach one adapter; on any error the model is left as it was.

    ``before(state)`` runs before the adapter is built, ``after(adapter)`` once it is built
    but not yet attached (loading checks a file against it there). ``initialise=False`` skips
    the random init of weights the caller overwrites (``inject.build``).
    """
    st, fresh, adapter, parts = _build(
        model, name, config, before, after, taken_hint, attaching=True, initialise=initialise
    )
    if fresh and freeze_base:
        st.frozen = _freeze(st)
    inject.attach(st, name, config, adapter, parts, trainable)
    return adapter


def build_detached(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    *,
    before: Callable[[State], None] | None = None,
    after: Callable[[nn.Module], None] | None = None,
    initialise: bool = True,
) -> tuple[nn.Module, list]:
    """Build and check an adapter for ``model`` without attaching it: ``(adapter, parts)``.

    The model is left as it was. :func:`attach_built` attaches the result later, so a server
    that checked a folder when reading it does not build it a second time to serve it.
    """
    st, fresh, adapter, parts = _build(
        model, name, config, before, after, "", attaching=False, initialise=initialise
    )
    if fresh:
        _drop_state(model, st)
    return adapter, parts


def attach_built(
    model: nn.Module,
    name: str,
    config: AdapterConfig,
    adapter: nn.Module,
    parts: list,
    *,
    trainable: bool = False,
) -> None:
    """Attach what :func:`build_detached` built (for this model, not attached meanwhile)."""
    with _state_for(model, name) as (st, fresh):
        before_add(st, name, parts)
    if fresh:
        st.frozen = _freeze(st)
    inject.attach(st, name, config, adapter, parts, trainable)


@contextlib.contextmanager
def _state_for(model: nn.Module, name: str, taken_hint: str = ""):
    """``(state, created)`` for adding ``name``: the model's state, created if need be and
    dropped again when the block raises, so a failed add leaves the model as it was."""
    fresh = get_state(model) is None
    st = get_state(model, create=True)
    try:
        if name in st.adapters:
            hint = f"; {taken_hint}" if taken_hint else ""
            raise AdapterExistsError(f"an adapter named {name!r} is already on this model{hint}")
        yield st, fresh
    except Exception:
        if fresh:
            _drop_state(model, st)
        raise


def _build(model, name, config, before, after, taken_hint: str, *, attaching: bool, initialise: bool = True):
    """(state, created it, adapter, parts): the adapter built and checked, not attached."""
    with _state_for(model, name, taken_hint) as (st, fresh):
        if before is not None:
            before(st)
        builder = mixture.build if isinstance(config, Mixture) else inject.build
        adapter, parts = builder(st, name, config, initialise=initialise)
        if attaching:
            before_add(st, name, parts)  # may put a fused FFN's hooks back: only when attaching
        if after is not None:
            after(adapter)
    return st, fresh, adapter, parts


def _freeze(st: State) -> list[tuple[nn.Parameter, bool]]:
    saved = []
    for mod in st.modules.values():
        for prm in mod.parameters(recurse=False):
            saved.append((prm, prm.requires_grad))
            prm.requires_grad_(False)
    return saved


def _drop_state(model: nn.Module, st: State) -> None:
    st.detach()
    for prm, flag in getattr(st, "frozen", []):
        prm.requires_grad_(flag)
    model.__dict__.pop("_paradapt_state", None)


def set_active(model: nn.Module, composition) -> None:
    """What every row uses outside ``route``: a name, a list (stacked), Stack, Average, Parallel, or None (base)."""
    st = require_state(model)
    _check_not_merged(st, composition)
    st.set_active(composition)


def active(model: nn.Module):
    """The composition set by ``set_active`` (a Route, a Parallel, or None)."""
    st = get_state(model)
    return None if st is None else st.active


def list_adapters(model: nn.Module) -> list[str]:
    st = get_state(model)
    return [] if st is None else list(st.adapters)


def _check_not_merged(st: State, comp) -> None:
    if st.merged and comp is not None:
        raise RoutingError(
            f"adapters {sorted(st.merged)} are merged into the base weights and apply to every row; "
            "unmerge them before activating or routing other adapters"
        )


@contextlib.contextmanager
def route(
    model: nn.Module,
    entries,
    *,
    packed: bool = False,
    lengths: list[int] | None = None,
    fixed_weights: bool = False,
):
    """Route row ``i`` of every forward in this block to ``entries[i]`` (a name, composition or None).

    Works inside ``model.generate`` (beams and returned sequences repeat each
    entry). A single composition instead of a list applies to every row.

    ``packed=True`` routes the tokens of one packed sequence (continuous batching's
    ``[1, T]`` input): ``entries[t]`` is token ``t``'s route, or with ``lengths`` (the
    requests' token counts, ``diff(cu_seq_lens_q)``) ``entries[i]`` is request ``i``'s.

    ``fixed_weights=True`` promises that no routed adapter's tensors were changed in place
    since a mixed batch last copied them into the site's bank (what a serving engine knows of
    the adapters it read from files). The banks then reuse their slots without checking each
    source tensor's version and storage, a check that took ~8 % of a decode step with 32
    LoRAs at q/k/v/o (``benchmarks/RESULTS.md``). Adding, removing or reloading an adapter is
    seen either way, and so is an in-place edit of an adapter whose tensors require a gradient
    (one being trained: its slots are always checked); only an in-place edit of a frozen
    adapter's tensors is not.
    """
    st = require_state(model)
    if lengths is not None and not packed:
        raise RoutingError("lengths= describes a packed sequence; pass packed=True with it")
    if packed:
        route_map = _packed_route_map(entries, lengths)
    elif isinstance(entries, (list, tuple)) and not isinstance(entries, str):
        routes = [normalize(e) for e in entries]
        route_map = RouteMap(routes)
    else:
        route_map = RouteMap.for_all(normalize(entries))
    route_map.fixed_weights = fixed_weights
    st.check_names(route_map.names())
    _check_not_merged(st, route_map.names() or None)
    if packed:
        mixture.refuse_packed(st, route_map.names())
        for site in st.sites.values():
            if site.kind == "attention":
                site.refuse_packed(route_map.names())
    token = st.push_route(route_map)
    try:
        yield route_map
    finally:
        st.pop_route(token)


def _packed_route_map(entries, lengths: list[int] | None) -> RouteMap:
    """Per-token route map of a packed sequence from per-token entries, or per-request ones and lengths."""
    if not isinstance(entries, (list, tuple)) or isinstance(entries, str):
        raise RoutingError("a packed route takes a list: one entry per token, or per request with lengths=")
    routes = [normalize(e) for e in entries]
    if lengths is None:
        return RouteMap.packed_tokens(routes)
    return RouteMap.packed_segments(routes, list(lengths))


def split_parallel(output, k: int) -> list:
    """Split a K-channel output (rows channel-major) into K outputs of the original batch."""

    def chunk(v, c):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] % k == 0:
            n = v.shape[0] // k
            return v[c * n : (c + 1) * n]
        return v

    if isinstance(output, torch.Tensor):
        return list(output.chunk(k, dim=0))
    if isinstance(output, dict):
        return [type(output)(**{key: chunk(v, c) for key, v in output.items()}) for c in range(k)]
    if isinstance(output, tuple):
        return [tuple(chunk(v, c) for v in output) for c in range(k)]
    raise RoutingError(f"cannot split an output of type {type(output).__name__}")


def parallel(model: nn.Module, composition: Parallel, *args, **inputs) -> list:
    """Run one input through every channel of ``composition`` in one forward; one output per channel."""
    if not isinstance(composition, Parallel):
        raise RoutingError("pa.parallel takes a pa.Parallel(...) composition")
    st = require_state(model)
    routes = [normalize(c) for c in composition.channels]
    st.check_names({n for r in routes if r is not None for n in r.names})
    _check_not_merged(st, routes if any(routes) else None)
    k = len(routes)
    args = tuple(_repeat(a, k) for a in args)
    inputs = {key: (_repeat(v, k) if key in State._BATCH_KEYS else v) for key, v in inputs.items()}
    token = st.push_route(_ChannelRouteMap(routes))
    try:
        out = model(*args, **inputs)
    finally:
        st.pop_route(token)
    return split_parallel(out, k)


def merge(model: nn.Module, name: str) -> None:
    """Fold a LoRA / (IA)^3 / SSF adapter into the base weights (clear error for other kinds)."""
    st = require_state(model)
    rec = st.record(name)
    if rec.merged:
        raise MergeError(f"adapter {name!r} is already merged" + (" (fused)" if rec.fused else ""))
    parts = [(st.sites[k], st.sites[k].components[name]) for k in rec.sites]
    check_mergeable(name, rec.config.kind, parts)
    for site, _ in parts:
        if is_quantized(site.module):
            raise MergeError(
                f"adapter {name!r} cannot be merged: base layer {site.key} is quantised "
                f"({site.module.precision}) and has no float weight to merge into; pa.dequantize(model) first"
            )
        owner = fused_owner(st, site.module) if site.kind == "linear" else None
        if owner is not None:
            raise MergeError(
                f"adapter {name!r} cannot be merged into {site.key}: adapter {owner!r} is fused there; "
                "unfuse it first"
            )
    for site, comp in parts:
        merge_into(site.module, comp, +1)
    rec.merged = True
    st.merged.add(name)
    if st.active is not None:
        st.set_active(None)


def unmerge(model: nn.Module, name: str) -> None:
    """Take a merged adapter back out of the base weights."""
    st = require_state(model)
    rec = st.record(name)
    if not rec.merged:
        raise MergeError(f"adapter {name!r} is not merged")
    if rec.fused is not None:
        raise MergeError(f"adapter {name!r} is fused, not merged; use pa.unfuse")
    for k in reversed(rec.sites):
        merge_into(st.sites[k].module, st.sites[k].components[name], -1)
    rec.merged = False
    st.merged.discard(name)


def fold(model: nn.Module, name: str) -> None:
    """Replace a prefix adapter's reparameterisation MLP by the plain prefix it produces (for inference)."""
    st = require_state(model)
    rec = st.record(name)
    for k in rec.sites:
        comp = st.sites[k].components[name]
        if hasattr(comp, "fold"):
            comp.fold()
    adapter = st.container[name]
    if getattr(adapter, "prefix_encoder", None) is not None:
        del adapter.prefix_encoder
    if getattr(rec.config, "reparam", False):
        rec.config = dataclasses.replace(rec.config, reparam=False)


def set_trainable(model: nn.Module, names, trainable: bool = True) -> None:
    """Explicitly make adapters trainable (or frozen); the only call that changes requires_grad.

    Their bank slots are freed: a slot remembers whether it was copied from trainable tensors
    (which ``fixed_weights`` routes still check), and that has just changed."""
    st = require_state(model)
    for n in [names] if isinstance(names, str) else names:
        rec = st.record(n)
        for prm in st.container[n].parameters():
            prm.requires_grad_(trainable)
        for k in rec.sites:
            st.sites[k].unbank(n)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete an adapter (unmerging it first if merged); sites left empty are unhooked."""
    st = require_state(model)
    rec = st.record(name)
    check_removable(st, name)
    mixture.check_removable(st, name)
    if rec.fused is not None:
        unfuse(model, name)
    if rec.merged:
        unmerge(model, name)
    for k in rec.sites:
        site = st.sites[k]
        comp = site.drop(name)
        inject.undo_pissa(st, k, comp)
        if not site.components:
            site.remove_hooks()
            del st.sites[k]
    del st.container[name]
    del st.adapters[name]
    if st.active is not None and name in _names_of(st.active):
        st.set_active(None)


def _is_mixture(st: State, name: str) -> bool:
    return isinstance(st.adapters[name].config, Mixture)


def _names_of(comp) -> set[str]:
    if isinstance(comp, Parallel):
        return {n for c in comp.channels if normalize(c) is not None for n in normalize(c).names}
    return set(comp.names)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every adapter and hook; the model's module tree and weights are the original's again."""
    st = get_state(model)
    if st is None:
        return model
    # fused first (PiSSA), then mixtures (their experts cannot go while they are there)
    for name in sorted(st.adapters, key=lambda n: (st.adapters[n].fused is None, not _is_mixture(st, n))):
        remove_adapter(model, name)
    _drop_state(model, st)
    assert CONTAINER not in model._modules
    return model


@dataclass
class ParameterCount:
    """Trainable-parameter summary: total per adapter and as a percentage of the base model."""

    base: int
    per_adapter: dict[str, int] = field(default_factory=dict)
    trainable: int = 0

    @property
    def adapters(self) -> int:
        return sum(self.per_adapter.values())

    def percent(self, name: str | None = None) -> float:
        n = self.adapters if name is None else self.per_adapter[name]
        return 100.0 * n / max(self.base, 1)

    def __str__(self) -> str:
        lines = [f"base model: {self.base:,} parameters; trainable now: {self.trainable:,}"]
        for n, c in self.per_adapter.items():
            lines.append(f"  {n}: {c:,} ({self.percent(n):.3f}% of base)")
        return "\n".join(lines)


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Count each adapter's parameters and the base model's, and what currently trains."""
    st = get_state(model)
    adapter_ids = set()
    per = {}
    if st is not None:
        for n in st.adapters:
            prms = list(st.container[n].parameters())
            per[n] = sum(p.numel() for p in prms)
            adapter_ids.update(id(p) for p in prms)
    all_params = list(model.parameters())
    base = sum(p.numel() for p in all_params if id(p) not in adapter_ids)
    trainable = sum(p.numel() for p in all_params if p.requires_grad)
    return ParameterCount(base=base, per_adapter=per, trainable=trainable)
