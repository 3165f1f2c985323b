"""Learned mixtures of adapters on a model: build the routers over named experts, check them,
and collect the load-balancing loss.

A mixture is an adapter record like any other (``model.paradapt[name]`` holds its weights:
one :class:`~paradapt.gate.MixtureGate` per site where its experts are, plus an optional
head), so ``set_active``, ``route``, ``save_adapter``/``load_adapter``, ``trainable_parameters``,
``set_trainable`` and ``remove_adapter`` work on it unchanged. Its experts stay separate
adapters, referenced by name: the gate looks them up on the site at each forward.
``lifecycle.add_mixture`` is the public entry; this module holds what it and loading share.
"""

from __future__ import annotations

import torch
from torch import nn

from . import archmap, inject
from .config import Mixture
from .errors import ConfigError, RoutingError, TargetNotFoundError
from .gate import MixtureGate
from .heads import ClassificationHead
from .state import AdapterModule, State, require_state

#: adapter kinds a mixture cannot gate: their components change the attention, not a site's delta
_PREFIX_KINDS = ("prefix", "mam")


def check_experts(state: State, config: Mixture) -> None:
    """Every expert is on the model, is a delta-at-a-site adapter, and is neither merged nor fused."""
    for i, name in enumerate(config.experts):
        rec = state.adapters.get(name)
        where = f"experts[{i}]"
        if rec is None:
            known = ", ".join(sorted(state.adapters)) or "none"
            raise ConfigError(
                where, f"no adapter named {name!r} on this model (loaded: {known}); add or load it first"
            )
        kind = rec.config.kind
        if kind == Mixture.kind:
            raise ConfigError(where, f"{name!r} is a mixture; a mixture of mixtures is not supported")
        if kind in _PREFIX_KINDS or any(state.sites[k].kind == "attention" for k in rec.sites):
            raise ConfigError(
                where,
                f"{name!r} is a {kind} adapter: prefix experts are not supported (a gate blends deltas "
                "at a site; a prefix changes the attention itself)",
            )
        if rec.merged or rec.fused is not None:
            how = "fused into the FFN (pa.unfuse it)" if rec.fused is not None else "merged (pa.unmerge it)"
            raise ConfigError(where, f"{name!r} is {how}; a mixture needs its experts as separate adapters")


def _sites(state: State, config: Mixture) -> dict[str, list[str]]:
    """Site key -> the experts there, in the mixture's order; only sites in ``config.layers``.

    Each expert must share a site with another one: a router chooses among the adapters at
    one site, so an expert alone everywhere would not be gated at all.
    """
    layers = inject.layer_indices(state, config.layers)
    out: dict[str, list[str]] = {}
    for name in config.experts:
        for key in state.adapters[name].sites:
            site = state.sites[key]
            if layers is not None and state.arch.layer_index(site.entry_name) not in layers:
                continue
            out.setdefault(key, []).append(name)
    for i, name in enumerate(config.experts):
        mine = [k for k, names in out.items() if name in names]
        if not mine:
            raise TargetNotFoundError(
                f"experts[{i}]", f"{name!r} has no site in layers {config.layers}: nothing to gate there"
            )
        if all(len(out[k]) == 1 for k in mine):
            raise ConfigError(
                f"experts[{i}]",
                f"{name!r} ({state.adapters[name].config.kind}) shares no site with the other experts "
                f"(it is at {mine[0]}{' ...' if len(mine) > 1 else ''}): a mixture's router chooses among "
                "adapters at the same sites (same kind of placement, e.g. all FFN blocks or all q/v LoRAs)",
            )
    return out


def build(
    state: State, name: str, config: Mixture, *, initialise: bool = True
) -> tuple[AdapterModule, list[tuple[inject.SiteSpec, nn.Module]]]:
    """The mixture's gates (and head), built and checked, nothing attached (as ``inject.build``)."""
    check_experts(state, config)
    hidden = inject.text_config(state.model).hidden_size
    adapter = AdapterModule()
    parts = []
    for key, experts in _sites(state, config).items():
        site = state.sites[key]
        d_in = archmap.linear_dims(site.module)[0] if site.kind == "linear" else hidden
        ref = next(state.container[experts[0]].components[AdapterModule.slot(key)].parameters())
        dtype = inject._DTYPES[config.dtype] if config.dtype else ref.dtype
        gate = MixtureGate(d_in, tuple(experts), config.top_k, config.granularity)
        if initialise:
            init_gate(gate, config.init)
        gate.to(device=ref.device, dtype=dtype)
        parts.append((inject.SiteSpec(site.kind, key, site.entry_name, site.exit_name), gate))
    if config.head is not None:
        ref = inject._ref_param(state.model)
        adapter.head = ClassificationHead(hidden, **config.head).to(device=ref.device)
    for spec, gate in parts:
        adapter.add(spec.key, gate)
    return adapter, parts


@torch.no_grad()
def init_gate(gate: MixtureGate, scheme: str) -> None:
    """``default``: zero weight and bias, so every expert gets the same logit (a uniform gate).
    ``random``: small random weights (tests)."""
    if scheme == "default":
        nn.init.zeros_(gate.router.weight)
        nn.init.zeros_(gate.router.bias)
    else:
        nn.init.normal_(gate.router.weight, std=0.5)
        nn.init.normal_(gate.router.bias, std=0.5)


def mixtures_using(state: State, name: str) -> list[str]:
    """The mixtures on the model that have ``name`` among their experts."""
    return [
        n
        for n, rec in state.adapters.items()
        if isinstance(rec.config, Mixture) and name in rec.config.experts
    ]


def check_removable(state: State, name: str) -> None:
    """Refuse removing an expert while a mixture uses it (its gates would name a missing adapter)."""
    users = mixtures_using(state, name)
    if users:
        raise ConfigError(
            "experts",
            f"adapter {name!r} is an expert of mixture {', '.join(map(repr, users))}; "
            "remove the mixture first (pa.remove_adapter)",
        )


def refuse_packed(state: State, names) -> None:
    """A sequence-level gate pools a row's tokens; in a packed route every token is a row."""
    for n in sorted(names):
        rec = state.adapters.get(n)
        if rec is not None and isinstance(rec.config, Mixture) and rec.config.granularity == "sequence":
            raise RoutingError(
                f"mixture {n!r} gates per sequence (granularity='sequence'), which a packed route cannot "
                "pool yet; route it in a padded batch, or use granularity='token'"
            )


def set_experts_trainable(state: State, config: Mixture) -> None:
    """Apply ``config.train_experts`` (an explicit request) to the experts; ``None`` leaves them."""
    if config.train_experts is None:
        return
    for n in config.experts:
        for prm in state.container[n].parameters():
            prm.requires_grad_(config.train_experts)


def mixture_aux_loss(model: nn.Module, name: str | None = None) -> torch.Tensor:
    """The load-balancing loss of the latest forward (with autograd) on this thread.

    The mean over the gates that ran (every site of every mixture, or of mixture ``name``)
    of Switch Transformer's ``K * sum_i f_i * P_i`` (see ``gate.MixtureGate.balance_loss``):
    1.0 when balanced. Add ``coef * pa.mixture_aux_loss(model)`` to the task loss (Switch used
    ``coef = 0.01``). A zero tensor when no gate ran (a forward under ``torch.no_grad``
    records none, so inference pays nothing for it).
    """
    st = require_state(model)
    if name is not None:
        rec = st.record(name)
        if not isinstance(rec.config, Mixture):
            raise ConfigError("name", f"adapter {name!r} is a {rec.config.kind} adapter, not a mixture")
    terms = [t for n, t in st.gate_losses() if name is None or n == name]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.float() for t in terms]).mean()
