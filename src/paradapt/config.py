"""Adapter configs: each method is a preset over three functions placed at sites.

The unified view (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning") writes every method as ``h <- h + delta`` at a site. A config
here only says *which* function goes *where*: it compiles to a list of
:class:`Placement`. The math lives in ``bottleneck.py``, ``scale_shift.py`` and
``prefix.py``; the sites in ``sites.py`` and ``prefix_attention.py``. Adding a method means adding a preset,
not a code path.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .checks import is_int
from .errors import ConfigError

FORMAT_VERSION = 1

ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh", "identity")

Function = Literal["bottleneck", "scale_shift", "prefix"]
SiteKind = Literal["block", "linear", "attention"]


@dataclass(frozen=True)
class Placement:
    """One function at one kind of site.

    ``targets`` is interpreted by the site kind: for ``block`` a block name
    (``"ffn"`` / ``"attn"``) or ``{"entry": regex, "exit": regex}``; for
    ``linear`` a list of module-name suffixes, a regex (full match),
    ``"all-linear"`` or a family alias (``"lora_default"``, ``"ia3_out"``,
    ``"ia3_in"``); for ``attention`` ignored (every self-attention).
    ``reads``: the delta is computed from the site's input or its output.
    ``writes``: the delta is added to the site's output (usual) or its input.
    """

    function: Function
    site: SiteKind
    targets: Any
    reads: Literal["input", "output"] = "input"
    writes: Literal["input", "output"] = "output"
    params: dict = field(default_factory=dict)


@dataclass
class AdapterConfig:
    """Fields every adapter kind shares."""

    kind: ClassVar[str] = ""
    layers: list[int] | None = None  # only these layers (None = all); -1 is the top one, as in Python
    init: str = "default"  # "default" starts as a no-op where the method allows; "random" for tests
    dtype: str | None = None  # parameter dtype; None = the base model's
    head: dict | None = None  # a classifier trained with the adapter: {"labels": [...], "pooling", "dropout"}

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(is_int(i) for i in self.layers):
                raise ConfigError(
                    "layers",
                    f"must be a list of layer indices (negative counts from the top), got {self.layers!r}",
                )
            self.layers = list(self.layers)
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("dtype", f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.head is not None:
            self.head = _check_head(self.head)

    def placements(self) -> list[Placement]:
        raise NotImplementedError

    # -- serialisation ----------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind
        return d

    @staticmethod
    def from_dict(d: dict, source: str = "config") -> AdapterConfig:
        """Build a config from a dict; unknown keys warn (forward compatible), unknown kinds fail."""
        d = dict(d)
        kind = d.pop("kind", None)
        if kind not in FILE_KINDS:
            raise ConfigError(
                "kind", f"unknown adapter kind {kind!r} in {source}; known: {sorted(FILE_KINDS)}"
            )
        cls = FILE_KINDS[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown {kind} config keys {unknown}", stacklevel=3)
        return cls(**{k: v for k, v in d.items() if k in names})


HEAD_KEYS = ("labels", "num_labels", "pooling", "dropout")


def _check_head(head: Any) -> dict:
    """Normalise a head spec to ``{"labels", "pooling", "dropout"}`` (labels default to 0..n-1)."""
    if not isinstance(head, dict):
        raise ConfigError("head", f"must be a dict like {{'labels': ['neg', 'pos']}}, got {head!r}")
    for k in head:
        if k not in HEAD_KEYS:
            hint = difflib.get_close_matches(str(k), HEAD_KEYS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"head.{k}", f"unknown key{extra}; known: {list(HEAD_KEYS)}")
    labels = head.get("labels")
    if labels is None:
        n = head.get("num_labels")
        if not is_int(n) or n < 2:
            raise ConfigError("head.num_labels", f"give labels or num_labels >= 2, got {n!r}")
        labels = list(range(n))
    if not isinstance(labels, (list, tuple)) or len(labels) < 2 or len(set(map(str, labels))) != len(labels):
        raise ConfigError("head.labels", f"must list at least two distinct labels, got {labels!r}")
    if "num_labels" in head and head["num_labels"] != len(labels):
        raise ConfigError("head.num_labels", f"{head['num_labels']} but {len(labels)} labels given")
    pooling = head.get("pooling", "mean")
    _check_choice(pooling, ("mean", "cls", "last"), "head.pooling")
    dropout = head.get("dropout", 0.1)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError("head.dropout", f"must be in [0, 1), got {dropout!r}")
    return {"labels": list(labels), "pooling": pooling, "dropout": float(dropout)}


def _check_rank(r: Any, name: str = "r") -> None:
    if not is_int(r) or r < 1:
        raise ConfigError(name, f"must be a positive integer, got {r!r}")


def _check_choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(name, f"must be one of {list(choices)}, got {value!r}{extra}")


def _check_scale(scale: Any) -> None:
    if scale == "learned":
        return
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ConfigError("scale", f"must be a number or 'learned', got {scale!r}")


def _check_targets(targets: Any, name: str = "targets") -> None:
    if targets is None or isinstance(targets, str):
        return
    if isinstance(targets, dict):
        if "entry" not in targets:
            raise ConfigError(name, "a custom block target needs an 'entry' regex (and optionally 'exit')")
        return
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(name, f"must be a module-name list, a regex or 'all-linear', got {targets!r}")


def _bottleneck_rank(r: int | None, reduction_factor: float | None) -> dict:
    """Rank is given directly or as hidden_size / reduction_factor (resolved per site)."""
    if r is None and reduction_factor is None:
        raise ConfigError("r", "give r or reduction_factor")
    if r is not None:
        _check_rank(r)
        return {"r": r}
    if not isinstance(reduction_factor, (int, float)) or reduction_factor <= 0:
        raise ConfigError("reduction_factor", f"must be a positive number, got {reduction_factor!r}")
    return {"reduction_factor": float(reduction_factor)}


@dataclass
class _BottleneckBlockConfig(AdapterConfig):
    """Fields shared by the block bottlenecks (parallel and series)."""

    r: int | None = None
    reduction_factor: float | None = None
    scale: float | str = 1.0
    act: str = "relu"
    bias: bool = True
    dropout: float = 0.0
    targets: Any = None  # {"entry": regex, "exit": regex} for models without an architecture map

    def validate(self) -> None:
        super().validate()
        _bottleneck_rank(self.r, self.reduction_factor)
        _check_scale(self.scale)
        _check_choice(self.act, ACTIVATIONS, "act")
        _check_choice(self.init, ("default", "random", "bert"), "init")
        _check_targets(self.targets)
        _check_dropout(self.dropout)

    def _blocks(self) -> list:
        raise NotImplementedError

    def placements(self) -> list[Placement]:
        params = {
            **_bottleneck_rank(self.r, self.reduction_factor),
            "act": self.act,
            "scale": self.scale,
            "bias": self.bias,
            "dropout": self.dropout,
        }
        blocks = [self.targets] if self.targets is not None else self._blocks()
        reads = "input" if self.kind == "parallel" else "output"
        return [Placement("bottleneck", "block", b, reads=reads, params=params) for b in blocks]


@dataclass
class ParallelConfig(_BottleneckBlockConfig):
    """He et al. 2022 parallel adapter: ``h <- h + s * act(x Wd + bd) Wu + bu``.

    ``x`` is the *input* of the block (FFN by default), the delta is added to the
    block's output before its residual add and norm. ``scale`` is a float (4.0 as
    in He et al.; 0.1 for AdaptFormer) or ``"learned"`` (a scalar parameter).
    ``reduction_factor``, when given, sets ``r = hidden / reduction_factor`` instead of ``r``.
    """

    kind: ClassVar[str] = "parallel"
    r: int | None = 64
    scale: float | str = 4.0
    location: str = "ffn"  # "ffn" | "attn" | "both"

    def validate(self) -> None:
        if self.reduction_factor is not None:  # an explicit reduction factor replaces the default r
            self.r = None
        super().validate()
        _check_choice(self.location, ("ffn", "attn", "both"), "location")

    def _blocks(self) -> list:
        return {"ffn": ["ffn"], "attn": ["attn"], "both": ["attn", "ffn"]}[self.location]


@dataclass
class SeriesConfig(_BottleneckBlockConfig):
    """Series bottleneck on a block's output: ``h <- h + s * act(h Wd + bd) Wu + bu``.

    ``variant="pfeiffer"``: after the FFN only (Pfeiffer et al. 2021).
    ``variant="houlsby"``: after attention and after the FFN (Houlsby et al. 2019).
    The bottleneck is ``hidden / reduction_factor`` (16) unless ``r`` is given.
    """

    kind: ClassVar[str] = "series"
    reduction_factor: float | None = 16.0
    variant: str = "pfeiffer"

    def validate(self) -> None:
        if self.r is not None:  # an explicit rank replaces the default reduction factor
            self.reduction_factor = None
        super().validate()
        _check_choice(self.variant, ("pfeiffer", "houlsby"), "variant")

    def _blocks(self) -> list:
        return ["ffn"] if self.variant == "pfeiffer" else ["attn", "ffn"]


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al. 2021): ``y <- y + (alpha / r) * dropout(x) A^T B^T`` on named linears.

    A bottleneck with identity activation and no biases, reading the linear's
    input. ``use_rslora`` scales by ``alpha / sqrt(r)`` (Kalajdzievski 2023).
    ``init``: "default" (Kaiming-uniform A, zero B), "gaussian", "pissa"
    (principal singular vectors; Meng et al. 2024), "loftq" (the rank-r SVD of the base
    weight's int4 quantisation error, so the adapter starts by undoing it; LoftQ, Li et al.
    2023, with the quantised base kept fixed: add it to a float base, then
    ``pa.quantize(model, "int4")``), "random" (non-zero B, tests).
    """

    kind: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    targets: Any = None  # None = the family default (q and v projections)
    dropout: float = 0.0
    use_rslora: bool = False

    def validate(self) -> None:
        super().validate()
        _check_rank(self.r)
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError("alpha", f"must be a positive number, got {self.alpha!r}")
        _check_choice(self.init, ("default", "gaussian", "pissa", "loftq", "random"), "init")
        _check_targets(self.targets)
        if isinstance(self.targets, dict):
            raise ConfigError("targets", "LoRA targets linears: give a name list, a regex or 'all-linear'")
        _check_dropout(self.dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5) if self.use_rslora else self.alpha / self.r

    def placements(self) -> list[Placement]:
        params = {
            "r": self.r,
            "act": "identity",
            "scale": self.scaling,
            "bias": False,
            "dropout": self.dropout,
        }
        return [Placement("bottleneck", "linear", self.targets or "lora_default", params=params)]


@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3 (Liu et al. 2022): learned vectors rescale keys, values and the FFN activation.

    ``k <- k * l_k``, ``v <- v * l_v`` (outputs of the k/v projections) and
    ``a <- a * l_ff`` (the FFN's intermediate activation, i.e. the input of its
    down projection). Vectors start at one, so the adapter starts as a no-op.
    """

    kind: ClassVar[str] = "ia3"
    targets: Any = None  # output-scaled linears; None = family default (k, v)
    feedforward_targets: Any = None  # input-scaled linears; None = family default (FFN down projection)

    def validate(self) -> None:
        super().validate()
        _check_choice(self.init, ("default", "random"), "init")
        _check_targets(self.targets)
        _check_targets(self.feedforward_targets, "feedforward_targets")

    def placements(self) -> list[Placement]:
        return [
            Placement(
                "scale_shift", "linear", self.targets or "ia3_out", reads="output", params={"shift": False}
            ),
            Placement(
                "scale_shift",
                "linear",
                self.feedforward_targets or "ia3_in",
                reads="input",
                writes="input",
                params={"shift": False},
            ),
        ]


@dataclass
class SSFConfig(AdapterConfig):
    """Scale-and-shift (Lian et al. 2022, SSF): ``y <- y * g + b`` on linear outputs.

    Starts at ``g = 1, b = 0`` (a no-op) and merges into the linear's weight and bias.
    """

    kind: ClassVar[str] = "ssf"
    targets: Any = "all-linear"

    def validate(self) -> None:
        super().validate()
        _check_choice(self.init, ("default", "random"), "init")
        _check_targets(self.targets)

    def placements(self) -> list[Placement]:
        return [Placement("scale_shift", "linear", self.targets, reads="output", params={"shift": True})]


@dataclass
class PrefixConfig(AdapterConfig):
    """Prefix tuning (Li & Liang 2021): learned keys/values prepended in every attention.

    ``reparam=True`` trains the prefix through an MLP (embedding -> tanh ->
    all layers' keys and values) as the paper does; ``pa.fold`` (or saving)
    turns it into a plain per-layer prefix for inference. ``gated=True`` uses a
    separate softmax over the prefix with a zero-initialised per-head gate
    (``out + tanh(g) * attn(q, P_k, P_v)``, LLaMA-Adapter), which starts as an
    exact no-op; the default joint softmax (the paper's form) cannot.
    """

    kind: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 30
    reparam: bool = True
    reparam_hidden: int = 512
    gated: bool = False

    def validate(self) -> None:
        super().validate()
        _check_rank(self.num_virtual_tokens, "num_virtual_tokens")
        _check_rank(self.reparam_hidden, "reparam_hidden")
        _check_choice(self.init, ("default", "random"), "init")

    def placements(self) -> list[Placement]:
        params = {
            "num_virtual_tokens": self.num_virtual_tokens,
            "reparam": self.reparam,
            "reparam_hidden": self.reparam_hidden,
            "gated": self.gated,
        }
        return [Placement("prefix", "attention", None, params=params)]


@dataclass
class MAMConfig(AdapterConfig):
    """Mix-and-Match adapter (He et al. 2022): prefix on attention + scaled parallel adapter on the FFN."""

    kind: ClassVar[str] = "mam"
    num_virtual_tokens: int = 30
    reparam: bool = True
    reparam_hidden: int = 512
    r: int | None = 512
    reduction_factor: float | None = None
    scale: float | str = 4.0
    act: str = "relu"
    gated: bool = False

    def validate(self) -> None:
        super().validate()
        _check_choice(self.init, ("default", "random"), "init")

    def _parts(self) -> tuple[PrefixConfig, ParallelConfig]:
        prefix = PrefixConfig(
            num_virtual_tokens=self.num_virtual_tokens,
            reparam=self.reparam,
            reparam_hidden=self.reparam_hidden,
            gated=self.gated,
            layers=self.layers,
            init=self.init,
        )
        parallel = ParallelConfig(
            r=self.r,
            reduction_factor=self.reduction_factor,
            scale=self.scale,
            act=self.act,
            location="ffn",
            layers=self.layers,
            init=self.init,
        )
        return prefix, parallel

    def placements(self) -> list[Placement]:
        prefix, parallel = self._parts()
        return prefix.placements() + parallel.placements()


def _check_dropout(p: Any) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError("dropout", f"must be in [0, 1), got {p!r}")


@dataclass
class Mixture(AdapterConfig):
    """A learned mixture of adapters (MixDA, MoLA, MeteoRA): ``h <- h + sum_i g_i(x) delta_i``.

    A composition like ``Average`` whose weights come from a small trainable router: at every
    site where its ``experts`` (adapters already on the model, by name) have components, a
    linear layer on the site's input gives one logit per expert there; the gate is their
    softmax, or with ``top_k`` the softmax over the ``top_k`` largest (renormalised weights).
    ``granularity="token"`` gates each token; ``"sequence"`` each row, from the mean of its
    tokens' logits in the forward. A site holding fewer than ``top_k`` experts uses them all.
    ``init="default"`` starts the routers at zero: a new mixture computes the uniform average
    of its experts (``Average``), or with ``top_k < K`` that of the first ``top_k`` at each site.
    ``train_experts``: ``True`` makes the experts trainable when the mixture is added (joint
    training), ``False`` freezes them (router-only training), ``None`` leaves them as they are.
    ``layers`` limits the routers (and so the mixture) to those layers. Added with
    ``pa.add_mixture``; see docs/mixtures.md.
    """

    kind: ClassVar[str] = "mixture"
    experts: list = field(default_factory=list)
    top_k: int | None = None  # None = every expert at the site (a dense softmax gate)
    granularity: str = "token"  # "token" | "sequence"
    train_experts: bool | None = None

    def validate(self) -> None:
        super().validate()
        e = self.experts
        if not isinstance(e, (list, tuple)) or not all(isinstance(n, str) and n for n in e):
            raise ConfigError("experts", f"must be a list of adapter names, got {e!r}")
        self.experts = list(e)
        if len(self.experts) < 2:
            raise ConfigError("experts", f"a mixture needs at least two experts, got {self.experts!r}")
        twice = sorted({n for n in self.experts if self.experts.count(n) > 1})
        if twice:
            raise ConfigError("experts", f"{twice} listed more than once")
        if self.top_k is not None and (not is_int(self.top_k) or not 1 <= self.top_k <= len(self.experts)):
            raise ConfigError(
                "top_k", f"must be an integer from 1 to {len(self.experts)} (the experts), got {self.top_k!r}"
            )
        _check_choice(self.granularity, ("token", "sequence"), "granularity")
        _check_choice(self.init, ("default", "random"), "init")
        if self.train_experts not in (None, True, False):
            raise ConfigError("train_experts", f"must be true, false or null, got {self.train_experts!r}")

    def placements(self) -> list[Placement]:
        raise ConfigError("config", "a Mixture is not placed like an adapter: add it with pa.add_mixture")


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    c.kind: c
    for c in (ParallelConfig, SeriesConfig, LoRAConfig, IA3Config, SSFConfig, PrefixConfig, MAMConfig)
}
# what an adapter folder may hold: an adapter kind, or a mixture (built over adapters by name)
FILE_KINDS: dict[str, type[AdapterConfig]] = {**CONFIG_CLASSES, Mixture.kind: Mixture}
