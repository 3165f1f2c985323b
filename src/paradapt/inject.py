"""Injection: turn a config's placements into components at concrete sites.

Two phases so that bad input never leaves a half-built adapter behind:
``build`` resolves every target and builds every component (raising on the
first problem, touching nothing); ``attach`` then creates the sites' hooks and
registers the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import archmap
from .bottleneck import Bottleneck, init_bottleneck
from .config import AdapterConfig, Placement
from .errors import ConfigError, TargetNotFoundError
from .heads import ClassificationHead
from .prefix import Prefix, PrefixEncoder, init_prefix, init_prefix_encoder
from .quantized import is_quantized
from .scale_shift import ScaleShift, init_scale_shift
from .state import AdapterModule, AdapterRecord, State

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SiteSpec:
    """A concrete site: its kind, key and the module names it hooks."""

    kind: str
    key: str
    entry: str
    exit: str


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _in_layers(state: State, name: str, layers: list[int] | None) -> bool:
    if layers is None:
        return True
    idx = state.arch.layer_index(name)
    return idx is not None and idx in layers


def _need_family(state: State, what: str):
    fam = state.arch.family
    if fam is None:
        raise ConfigError(
            "targets",
            f"{type(state.model).__name__} matches no known architecture (Llama/Qwen/Mistral, GPT-2, BERT/RoBERTa), "
            f"so '{what}' has no meaning here; name the modules with a pattern instead",
        )
    return fam


def resolve(state: State, p: Placement, layers: list[int] | None) -> list[SiteSpec]:
    """The sites one placement covers on this model."""
    t = p.targets
    if p.site == "block":
        if isinstance(t, dict):
            entries = archmap.match_regex(state.names, t["entry"])
            exits = archmap.match_regex(state.names, t.get("exit") or t["entry"])
            if not entries or len(entries) != len(exits):
                raise TargetNotFoundError(
                    "targets",
                    f"entry {t['entry']!r} matched {len(entries)} modules and exit matched {len(exits)}",
                )
            specs = [SiteSpec("block", f"{e}.block", e, x) for e, x in zip(entries, exits, strict=True)]
            specs = [s for s in specs if _in_layers(state, s.entry, layers)]
        else:
            fam = _need_family(state, t)
            entry, exit = getattr(fam, t)
            specs = [
                SiteSpec("block", f"{layer}.{t}", f"{layer}.{entry}", f"{layer}.{exit}")
                for i, layer in enumerate(state.arch.layers)
                if layers is None or i in layers
            ]
    elif p.site == "linear":
        if t in ("lora_default", "ia3_out", "ia3_in"):
            fam = _need_family(state, t)
            names = [f"{layer}.{rel}" for layer in state.arch.layers for rel in getattr(fam, t)]
        elif t == "all-linear":
            names = [n for n in state.linear_names if state.arch.layer_index(n) is not None]
        elif isinstance(t, str):
            names = archmap.match_regex(state.linear_names, t)
        else:
            names = archmap.match_suffixes(state.linear_names, t)
        specs = [SiteSpec("linear", n, n, n) for n in names if _in_layers(state, n, layers)]
    else:  # attention
        fam = _need_family(state, "prefix")
        specs = [
            SiteSpec(
                "attention",
                f"{layer}.{fam.attention}",
                f"{layer}.{fam.attention}",
                f"{layer}.{fam.attention}",
            )
            for i, layer in enumerate(state.arch.layers)
            if layers is None or i in layers
        ]
    if not specs:
        what = "linear module" if p.site == "linear" else "module"
        raise TargetNotFoundError("targets", f"{t!r} matched no {what} of {type(state.model).__name__}")
    return specs


def layer_indices(state: State, layers: list[int] | None) -> list[int] | None:
    """``config.layers`` as sorted non-negative indices: ``-k`` is the k-th layer from the top,
    so ``[-3, -2, -1]`` means "the top three" on a model of any depth; two indices naming the
    same layer count once."""
    if layers is None:
        return None
    n = len(state.arch.layers)
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ConfigError("layers", f"{bad} out of range: {type(state.model).__name__} has {n} layers")
    return sorted({i % n for i in layers})


def _ref_param(module: nn.Module) -> torch.Tensor:
    for prm in module.parameters():
        return prm
    for m in module.modules():  # a quantised block's weights are int buffers: take their float dtype
        if is_quantized(m):
            return m.reference()
    raise ConfigError("targets", f"{type(module).__name__} has no parameters to take a device and dtype from")


def _rank(params: dict, d_in: int) -> int:
    return params["r"] if "r" in params else max(1, round(d_in / params["reduction_factor"]))


def build(
    state: State, name: str, config: AdapterConfig, *, initialise: bool = True
) -> tuple[AdapterModule, list[tuple[SiteSpec, nn.Module]]]:
    """Resolve and build every component; raises before anything is attached.

    ``initialise=False``: leave the weights uninitialised, for a caller that overwrites every
    one of them (a load from a file). PiSSA always initialises: its attach subtracts the
    initial factors from the base.
    """
    layers = layer_indices(state, config.layers)
    init = initialise or config.init == "pissa"
    tcfg = text_config(state.model)
    hidden = tcfg.hidden_size
    adapter = AdapterModule()
    parts: list[tuple[SiteSpec, nn.Module]] = []
    seen: set[str] = set()
    for p in config.placements():
        specs = resolve(state, p, layers)
        encoder = None
        for li, spec in enumerate(specs):
            if spec.key in seen:
                raise ConfigError("targets", f"{spec.key} is targeted twice by adapter {name!r}")
            seen.add(spec.key)
            ref = _ref_param(state.modules[spec.entry])
            dtype = _DTYPES[config.dtype] if config.dtype else ref.dtype
            if p.function == "bottleneck":
                if spec.kind == "linear":
                    d_in, d_out = archmap.linear_dims(state.modules[spec.entry])
                else:
                    d_in = d_out = hidden
                r = _rank(p.params, d_in)
                comp = Bottleneck(
                    d_in,
                    d_out,
                    r,
                    act=p.params["act"],
                    scale=p.params["scale"],
                    bias=p.params["bias"],
                    dropout=p.params["dropout"],
                    reads=p.reads,
                    writes=p.writes,
                    initialise=init,
                )
                base_w = _init_weight(state, spec, config.init)
                if init:
                    init_bottleneck(comp, config.init, base_weight=base_w)
            elif p.function == "scale_shift":
                if spec.kind == "linear":
                    d_in, d_out = archmap.linear_dims(state.modules[spec.entry])
                    dim = d_out if p.writes == "output" else d_in
                else:
                    dim = hidden
                comp = ScaleShift(dim, shift=p.params["shift"], reads=p.reads, writes=p.writes)
                if init:
                    init_scale_shift(comp, config.init)
            else:
                n_heads = tcfg.num_attention_heads
                n_kv = getattr(tcfg, "num_key_value_heads", None) or n_heads
                head_dim = getattr(tcfg, "head_dim", None) or hidden // n_heads
                comp = Prefix(
                    p.params["num_virtual_tokens"], n_heads, n_kv, head_dim, gated=p.params["gated"]
                )
                if init:
                    init_prefix(comp, config.init)
                if p.params["reparam"]:
                    if encoder is None:
                        encoder = PrefixEncoder(
                            p.params["num_virtual_tokens"],
                            hidden,
                            p.params["reparam_hidden"],
                            len(specs),
                            n_kv * head_dim,
                        )
                        if init:
                            init_prefix_encoder(encoder, config.init)
                        adapter.prefix_encoder = encoder
                    comp.attach_encoder(encoder, li)
            comp.to(device=ref.device, dtype=dtype)
            parts.append((spec, comp))
    if getattr(adapter, "prefix_encoder", None) is not None:
        adapter.prefix_encoder.to(device=ref.device, dtype=dtype)
    if config.head is not None:
        ref = _ref_param(state.model)
        adapter.head = ClassificationHead(hidden, **config.head).to(device=ref.device)
    for spec, comp in parts:
        adapter.add(spec.key, comp)
    return adapter, parts


@torch.no_grad()
def _init_weight(state: State, spec: SiteSpec, init: str) -> torch.Tensor | None:
    """What a LoRA's SVD init factors: the base weight (PiSSA) or its int4 quantisation error
    (LoftQ). Both need the float weight, so a site already quantised is refused."""
    if init not in ("pissa", "loftq"):
        return None
    module = state.modules[spec.entry]
    if is_quantized(module):
        fix = "pa.dequantize(model) first" if init == "pissa" else "add it before pa.quantize(model, 'int4')"
        raise ConfigError(
            "init", f"{init} needs the float weight of {spec.entry}, which is quantised ({module.precision}); {fix}"
        )
    w = archmap.weight_out_in(module).detach()
    if init == "pissa":
        return w
    return w.float() - quantization_error_reference(spec.entry, w)


def quantization_error_reference(name: str, w: torch.Tensor) -> torch.Tensor:
    """``Q(W)`` as ``pa.quantize(model, "int4")`` (groups of 32) will store it, in float32.

    LoftQ here runs one alternation with the quantised base fixed (the original alternates
    ``Q = quant(W - AB)``, ``AB = svd_r(W - Q)``, which gives every adapter its own base):
    paradapt's adapters share one base, so the base must be plain ``quant(W)``.
    """
    from .quantized import quantize_weight

    return quantize_weight(name, w, "int4", 32).dequantized_weight(torch.float32)


@torch.no_grad()
def _apply_pissa(state: State, spec: SiteSpec, comp: Bottleneck) -> None:
    """PiSSA: the base keeps only the residual ``W - s * B A``; the principal part trains as the adapter."""
    w = archmap.weight_out_in(state.modules[spec.entry])
    comp.register_buffer("pissa_down0", comp.down.weight.detach().clone(), persistent=False)
    comp.register_buffer("pissa_up0", comp.up.weight.detach().clone(), persistent=False)
    w.sub_((comp.up.weight @ comp.down.weight * comp.scale).to(w.dtype))


@torch.no_grad()
def undo_pissa(state: State, site_key: str, comp: nn.Module) -> None:
    if getattr(comp, "pissa_down0", None) is None:
        return
    w = archmap.weight_out_in(state.modules[site_key])
    w.add_((comp.pissa_up0 @ comp.pissa_down0 * comp.scale).to(w.dtype))


def attach(
    state: State, name: str, config: AdapterConfig, adapter: AdapterModule, parts, trainable: bool
) -> AdapterRecord:
    """Hook the sites and register the weights (cannot fail on user input)."""
    for prm in adapter.parameters():
        prm.requires_grad_(trainable)
    adapter.train(state.model.training)  # a new adapter follows the model's mode (no dropout at inference)
    state.container[name] = adapter
    rec = AdapterRecord(name, config, base_info=base_info(state))
    for spec, comp in parts:
        if spec.kind == "block":
            site = state.block_site(spec.key, spec.entry, spec.exit)
        elif spec.kind == "linear":
            site = state.linear_site(spec.key)
            if config.init == "pissa":
                _apply_pissa(state, spec, comp)
        else:
            site = state.attention_site(spec.key)
        site.add(name, comp)
        rec.sites.append(spec.key)
    state.adapters[name] = rec
    return rec


def base_info(state: State) -> dict:
    """What an adapter file records of its base model, to check compatibility on load."""
    cfg = text_config(state.model)
    return {
        "name_or_path": getattr(state.model.config, "_name_or_path", "") or "",
        "model_type": getattr(state.model.config, "model_type", ""),
        "hidden_size": cfg.hidden_size,
        "num_layers": len(state.arch.layers),
        "family": state.arch.family.name if state.arch.family else None,
    }
