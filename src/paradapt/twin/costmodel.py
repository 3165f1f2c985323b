"""The twin's cost model: seconds per engine step and per adapter move, fitted on this machine.

A step's time is linear in counts the scheduler knows before the model runs
(:class:`~paradapt.serve.core.StepShape`): a fixed cost per step, per token, per sequence,
per sampled token, per attended KV position, per adapter attached since the last step, per adapter resident on
the device (attached adapters cost a little even when a step does not route to them), and
per adapter kind ``k`` the distinct adapters of that kind in the step and the tokens routed
through them times their rank. A learned mixture's tokens (:class:`MixtureCost`) add the
distinct mixtures of the step (their routers, per site), their tokens times the experts each
evaluates (``top_k``, or every expert for a dense gate: the rows its experts' banks get), and,
to its experts' kinds, the experts as adapters of the step and the expected rank-tokens of the
rows they get (each expert ``evaluated / K`` of the tokens). Adapter moves cost ``a + b * bytes`` per operation (disk ->
host, host -> device, the two evictions). Coefficients are non-negative (time never goes down
with more work) and fitted by non-negative least squares (:func:`fit_linear`).

An optional ``server`` section (:class:`ServerCost`, measured by ``paradapt profile --server``)
prices what the HTTP server adds: seconds per step and per streamed token on the engine's
thread, and a per-request latency (HTTP, hand-off, the first chunk's delivery). Files without
it load as before; the twin then predicts the in-process engine. An optional ``ray`` section
(:class:`RayCost`, fitted by :func:`paradapt.twin.ray_cost.fit_ray_cost`) prices what serving
through Ray Serve adds to each replica, and the cores its processes share on one machine.

The file (:meth:`CostModel.save`) carries a fingerprint of the machine and model it was
measured on; :meth:`CostModel.check` warns, naming both, when it is used elsewhere.

Torch-free: predicting is a dot product in pure Python (numpy and scipy only to fit).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..checks import read_structured
from ..errors import ConfigError
from ..files import write_text_atomic
from ..serve.core import StepShape

FORMAT = "paradapt-costmodel/1"
#: The cost model shipped with the package: the default random Llama (hidden 512, 8 layers),
#: measured by ``paradapt profile --threads 1`` on the machine that built this release.
DEFAULT_COST = Path(__file__).with_name("default_cost.json")
MOVE_OPS = ("load_host", "load_device", "evict_device", "evict_host")
BASE_FEATURES = (
    "step",
    "tokens",
    "seqs",
    "samplers",
    "attention",
    "context",
    "packed_attention",
    "device_loads",
    "resident",
    "mixtures",
    "mixture_tokens",
    "few_rows",
)
#: Model config keys that decide its speed (the model part of a fingerprint).
MODEL_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class CostModelMismatch(UserWarning):
    """A cost model measured on another machine or model is being used."""


@dataclass(frozen=True)
class MixtureCost:
    """What pricing a learned mixture's tokens needs: its experts (names priced by their own
    (kind, rank) in the same mapping) and how many of them each token evaluates (``top_k``, or
    all of them for a dense gate)."""

    experts: tuple[str, ...]
    evaluated: int


#: What a cost mapping holds per adapter name: (kind, rank), or a mixture's :class:`MixtureCost`.
AdapterCost = tuple[str, int] | MixtureCost


def kind_features(kinds: Sequence[str]) -> tuple[str, ...]:
    """Feature names of the per-kind terms."""
    return tuple(f for k in kinds for f in (f"adapters_{k}", f"rank_tokens_{k}"))


def featurize(
    shape: StepShape,
    adapters: Mapping[str, AdapterCost],
    kinds: Sequence[str],
    packed_prompts: bool = True,
    kernel_rows: int = 0,
) -> dict[str, float]:
    """The cost features of one step; ``adapters`` maps an adapter name to (kind, rank), or a
    mixture's name to its :class:`MixtureCost`. ``packed_prompts``: the engine attends a step
    with prompt tokens over its whole packed row (transformers' path, CUDA); on the CPU every
    step attends per request (``serve/hf_paged.py``) and ``packed_attention`` is 0.
    ``kernel_rows``: the most rows the engine's linear layers multiply with the few-rows kernel
    (serve/layer_gemm.py; 0: never). Such steps cost more per token than MKL's but without its
    fixed cost, so a step's cost bends at that row count: ``few_rows`` = min(tokens, kernel_rows)
    is the extra per-token slope below it (and a constant above)."""
    f = {
        "step": 1.0,
        "tokens": float(shape.tokens),
        "seqs": float(shape.seqs),
        "samplers": float(shape.samplers),
        "attention": float(shape.attention),
        # on transformers' path a step with prompt tokens reads back every sequence's KV
        # (``context``) and its one [1, T] row attends over all of it under a block-diagonal
        # mask: T x context products, not the sum over sequences that ``attention`` counts. On
        # the CPU every step attends per request (serve/hf_paged.py's lean_decode), so its cost
        # is ``attention``'s, and T x context would price work it does not do
        "context": float(shape.context),
        "packed_attention": (
            float(shape.tokens * shape.context) if packed_prompts and shape.prefill_tokens else 0.0
        ),
        "device_loads": float(shape.device_loads),
        "resident": float(shape.resident),
        "mixtures": 0.0,
        "mixture_tokens": 0.0,
        "few_rows": float(min(shape.tokens, kernel_rows)),
    }
    for k in kinds:
        f[f"adapters_{k}"] = 0.0
        f[f"rank_tokens_{k}"] = 0.0
    seen: set[str] = set()  # adapters counted in this step (an expert may also be routed by name)

    def add(name: str, tokens: float) -> None:
        kind, rank = adapters[name]
        if kind not in kinds:
            raise ConfigError(
                "kinds",
                f"the cost model has no coefficients for adapter kind {kind!r} (profiled: {list(kinds)})",
            )
        if name not in seen:
            seen.add(name)
            f[f"adapters_{kind}"] += 1.0
        f[f"rank_tokens_{kind}"] += tokens * rank

    for name, n in shape.adapter_tokens:
        if name is None:
            continue
        entry = adapters[name]
        if isinstance(entry, MixtureCost):
            f["mixtures"] += 1.0
            f["mixture_tokens"] += float(n * entry.evaluated)
            for expert in entry.experts:  # each expert gets evaluated / K of the tokens, on average
                add(expert, n * entry.evaluated / len(entry.experts))
        else:
            add(name, float(n))
    return f


def _non_negative(section: Any, name: str, fields_: Sequence[str]) -> None:
    """Each of ``fields_`` of a cost section as a float, or a ConfigError naming ``name.field``."""
    for f in fields_:
        raw = getattr(section, f)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name}.{f}", f"must be a finite number >= 0, got {raw!r}")
        setattr(section, f, v)


def _section_dict(section: Any) -> dict[str, Any]:
    """A cost section's fields, as its file stores them."""
    return {f.name: getattr(section, f.name) for f in fields(section)}


def _section_from(cls: type, d: Mapping[str, Any], name: str) -> Any:
    """A cost section from its file's object; absent fields keep their defaults."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{name}: expected an object, got {type(d).__name__}")
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class ServerCost:
    """What ``paradapt serve`` adds to the in-process engine (``paradapt profile --server``).

    * ``step`` + ``token`` x tokens emitted: extra seconds of each engine step behind the HTTP
      app (the event loop's per-token work competes with the engine thread for the GIL and
      the cores, and the thread's bookkeeping between steps), on top of ``CostModel.step_time``;
    * ``request``: seconds added to each request's first-token and finish times, a pure latency
      (HTTP parsing, validation, the hand-off to the engine thread, the first chunk's delivery),
      not engine time: it delays no other request.

    ``requests`` counts the requests the fit was measured on; ``fit`` says how well it fits.
    """

    request: float = 0.0
    step: float = 0.0
    token: float = 0.0
    requests: int = 0
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _non_negative(self, "server", ("request", "step", "token"))
        if isinstance(self.requests, bool) or not isinstance(self.requests, int) or self.requests < 0:
            raise ConfigError("server.requests", f"must be an integer >= 0, got {self.requests!r}")
        self.fit = dict(self.fit)

    def step_time(self, emitted: int) -> float:
        """Extra seconds of a step that streamed ``emitted`` tokens."""
        return self.step + self.token * emitted

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServerCost:
        return _section_from(cls, d, "server")

    def describe(self) -> str:
        """One line per term, for :meth:`CostModel.describe`."""
        lines = [
            f"HTTP server (paradapt profile --server, {self.requests} requests):",
            f"  per step {self.step * 1e6:.1f} us + per streamed token {self.token * 1e6:.1f} us (engine time)",
            f"  per request {self.request * 1e3:.3f} ms (latency added to first token and finish)",
        ]
        lines += fit_lines(self.fit, lambda k: f"  {k.replace('_', ' ')}", "  fit")
        return "\n".join(lines)


@dataclass
class RayCost:
    """What ``paradapt serve --replicas N`` adds to each replica, and what its processes take
    from the cores they share (:func:`paradapt.twin.ray_cost.fit_ray_cost`).

    * ``token``: engine seconds per streamed token, on top of ``server``'s: behind Ray Serve
      each chunk also crosses the replica actor's streaming generator, whose threads take the
      replica process's GIL from the engine thread;
    * ``replica_cpu``: cores a busy replica process uses (its engine thread and Ray's threads);
    * ``outside_cpu``: CPU seconds per processed token (prompt and output) outside the replicas:
      the ingress, Ray's proxy, Serve's controller, the raylet, GCS and agents, and a load
      client on the same machine;
    * ``cores``: the cores all of them shared where measured. Replicas on one machine whose
      demand (busy replicas x ``replica_cpu`` + ``outside_cpu`` x tokens/s) passes ``cores``
      run that much slower (:func:`paradapt.twin.cluster.simulate_cluster`).
    """

    token: float = 0.0
    replica_cpu: float = 1.0
    outside_cpu: float = 0.0
    cores: int = 1
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _non_negative(self, "ray", ("token", "replica_cpu", "outside_cpu"))
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ConfigError("ray.cores", f"must be an integer >= 1, got {self.cores!r}")
        self.fit = dict(self.fit)

    def demand(self, busy: float, tokens_per_s: float) -> float:
        """Cores wanted by ``busy`` replicas (busy replica-seconds per second) at ``tokens_per_s``."""
        return busy * self.replica_cpu + self.outside_cpu * tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        return _section_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RayCost:
        return _section_from(cls, d, "ray")

    def describe(self) -> str:
        lines = [
            "Ray Serve (paradapt.twin.ray_cost):",
            f"  per streamed token {self.token * 1e6:.1f} us more in a replica (engine time)",
            f"  a busy replica uses {self.replica_cpu:.2f} cores; outside the replicas "
            f"{self.outside_cpu * 1e6:.1f} us CPU per processed token; {self.cores} cores shared",
        ]
        lines += fit_lines(self.fit, lambda k: f"  {k.replace('_', ' ')}", "  fit")
        return "\n".join(lines)


@dataclass
class CostModel:
    """Fitted costs: ``step`` coefficients by feature name, ``moves`` (a, b) per op, adapter sizes.

    Build one from coefficients in code (tests, the configurator) with :meth:`from_coefficients`,
    from a file with :meth:`load`, or by measuring with :func:`paradapt.twin.profile.profile`.
    ``adapter_size`` maps a kind to (bytes per rank, fixed bytes) of an adapter on this model;
    ``kv_bytes_per_token`` is the KV cache's cost per token (for ``EngineConfig.device_memory``).
    ``submit`` and ``loop`` are the seconds to queue one request and one driver iteration.
    ``server`` (optional) prices the HTTP server on top (:class:`ServerCost`), ``ray``
    (optional) Ray Serve's replicas on top of that (:class:`RayCost`).
    """

    step: dict[str, float]
    moves: dict[str, tuple[float, float]]
    adapter_size: dict[str, tuple[float, float]]
    kv_bytes_per_token: int = 0
    submit: float = 0.0
    loop: float = 0.0
    fingerprint: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    server: ServerCost | None = None
    ray: RayCost | None = None

    def __post_init__(self) -> None:
        self.kinds = tuple(sorted(self.adapter_size))
        names = (*BASE_FEATURES, *kind_features(self.kinds))
        self.step = {n: float(self.step.get(n, 0.0)) for n in names}
        for n, v in self.step.items():
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"step.{n}", f"must be a finite number >= 0, got {v!r}")
        self.moves = {op: (float(a), float(b)) for op, (a, b) in self.moves.items()}
        for op in MOVE_OPS:
            self.moves.setdefault(op, (0.0, 0.0))
        self.adapter_size = {k: (float(a), float(b)) for k, (a, b) in self.adapter_size.items()}
        self._names = names

    @property
    def packed_prompts(self) -> bool:
        """Whether the profiled engine attended steps with prompt tokens over the packed row
        (:func:`featurize`): as the profile recorded it, else from the machine (older files)."""
        return bool(self.fit.get("packed_prompts", self.fingerprint.get("device") != "cpu"))

    @property
    def kernel_rows(self) -> int:
        """The most rows the profiled engine multiplied with the few-rows kernel (:func:`featurize`;
        0 in files profiled before it)."""
        return int(self.fit.get("kernel_rows", 0))

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_coefficients(
        cls,
        step: Mapping[str, float],
        *,
        moves: Mapping[str, tuple[float, float]] | None = None,
        adapter_size: Mapping[str, tuple[float, float]] | None = None,
        kv_bytes_per_token: int = 32768,
        submit: float = 0.0,
        loop: float = 0.0,
        server: ServerCost | None = None,
    ) -> CostModel:
        """A cost model from given coefficients (no profiling); unknown step features are an error.

        ``adapter_size`` defaults to LoRA/parallel/series at 60 kB per rank (the benchmark model's
        order of magnitude).
        """
        sizes = dict(adapter_size or {k: (60_000.0, 1_000.0) for k in ("lora", "parallel", "series")})
        known = {*BASE_FEATURES, *kind_features(sorted(sizes))}
        unknown = sorted(set(step) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown cost feature; known: {sorted(known)}")
        return cls(
            dict(step),
            dict(moves or {}),
            sizes,
            kv_bytes_per_token=kv_bytes_per_token,
            submit=submit,
            loop=loop,
            fingerprint={"source": "coefficients"},
            server=server,
        )

    # -- prediction -------------------------------------------------------------------
    def step_time(self, shape: StepShape, adapters: Mapping[str, AdapterCost]) -> float:
        """Seconds of one step of ``shape`` (adapters: name -> (kind, rank) or a :class:`MixtureCost`)."""
        f = featurize(shape, adapters, self.kinds, self.packed_prompts, self.kernel_rows)
        return sum(self.step[n] * v for n, v in f.items() if v)

    def move_time(self, op: str, size: int) -> float:
        a, b = self.moves[op]
        return a + b * size

    def adapter_bytes(self, kind: str, rank: int) -> int:
        """Bytes of an adapter of ``kind`` and ``rank`` on the profiled model."""
        if kind not in self.adapter_size:
            raise ConfigError(
                "kinds",
                f"the cost model has no size for adapter kind {kind!r} (profiled: {list(self.kinds)}; "
                f"paradapt profile --kinds {','.join([*self.kinds, kind])} measures it)",
            )
        per_rank, fixed = self.adapter_size[kind]
        return int(round(per_rank * rank + fixed))

    # -- files ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The file's content; ``server`` and ``ray`` only when measured (an older file's hash stays the same)."""
        d = {
            "format": FORMAT,
            "step": self.step,
            "moves": {op: list(v) for op, v in self.moves.items()},
            "adapter_size": {k: list(v) for k, v in self.adapter_size.items()},
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "submit": self.submit,
            "loop": self.loop,
            "fingerprint": self.fingerprint,
            "fit": self.fit,
        }
        if self.server is not None:
            d["server"] = self.server.to_dict()
        if self.ray is not None:
            d["ray"] = self.ray.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "cost model") -> CostModel:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ConfigError("cost", f"{source}: not a paradapt cost model (format {FORMAT!r} expected)")
        try:
            return cls(
                dict(d["step"]),
                {op: tuple(v) for op, v in d["moves"].items()},
                {k: tuple(v) for k, v in d["adapter_size"].items()},
                kv_bytes_per_token=int(d.get("kv_bytes_per_token", 0)),
                submit=float(d.get("submit", 0.0)),
                loop=float(d.get("loop", 0.0)),
                fingerprint=dict(d.get("fingerprint", {})),
                fit=dict(d.get("fit", {})),
                server=None if d.get("server") is None else ServerCost.from_dict(d["server"]),
                ray=None if d.get("ray") is None else RayCost.from_dict(d["ray"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError("cost", f"{source}: malformed cost model ({type(e).__name__}: {e})") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, expect: Mapping[str, Any] | None = None) -> CostModel:
        """Read a cost file; with ``expect`` (a fingerprint), warn when it was measured elsewhere."""
        path = Path(path)
        d = read_structured(path, "cost")
        cm = cls.from_dict(d, source=str(path))
        if expect is not None:
            cm.check(expect, source=str(path))
        return cm

    def check(self, current: Mapping[str, Any], source: str = "the cost model") -> list[str]:
        """Warn (:class:`CostModelMismatch`) about fingerprint keys that differ; returns them."""
        diffs = [
            k
            for k, v in current.items()
            if k in self.fingerprint and v is not None and self.fingerprint[k] != v
        ]
        if diffs:
            both = "; ".join(f"{k}: file {self.fingerprint[k]!r}, here {current[k]!r}" for k in diffs)
            warnings.warn(
                f"{source} was measured on another machine or model ({both}); its times may not hold here",
                CostModelMismatch,
                stacklevel=2,
            )
        return diffs

    def describe(self) -> str:
        """Coefficients and fit error, for printing."""
        lines = ["step time = sum of coefficient x feature:"]
        units = {
            "attention": "s per attended KV position",
            "tokens": "s per token",
            "context": "s per KV position read",
            "packed_attention": "s per query token x KV position",
            "mixtures": "s per mixture in the step",
            "mixture_tokens": "s per mixture token x expert evaluated",
        }
        for n, v in self.step.items():
            lines.append(f"  {n:<22}{v * 1e6:>12.4g} us   {units.get(n, '')}".rstrip())
        lines.append("adapter moves = a + b x bytes:")
        for op, (a, b) in self.moves.items():
            lines.append(f"  {op:<14} a = {a * 1e3:8.3f} ms   b = {b * 1e9:8.4f} s/GB")
        lines.append(f"queue a request: {self.submit * 1e6:.1f} us; driver loop: {self.loop * 1e6:.1f} us")
        lines += fit_lines(self.fit, lambda k: f"step-time fit, {k}", "profile")
        if self.server is not None:
            lines.append(self.server.describe())
        if self.ray is not None:
            lines.append(self.ray.describe())
        return "\n".join(lines)


# -- fitting -----------------------------------------------------------------------------------


def fit_linear(rows: Sequence[Sequence[float]], y: Sequence[float], *, relative: bool = True) -> list[float]:
    """Non-negative least squares ``y ~ X c`` on scaled columns.

    ``relative`` minimises relative error, weighing each row by 1 / its *predicted* time
    (iteratively reweighted, starting from 1 / observed): weights from the observations would
    favour the rows that happened to run fast and bias every prediction low, and the twin sums
    many predicted steps, so an unbiased mean is what its throughput needs.
    """
    import numpy as np
    from scipy.optimize import nnls

    X = np.asarray(rows, dtype=float)
    t = np.asarray(y, dtype=float)
    if X.ndim != 2 or X.shape[0] != t.shape[0] or X.shape[0] == 0:
        raise ConfigError("samples", f"need a non-empty matrix of samples with one time each, got {X.shape}")
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    Xs = X / scale
    floor = max(float(np.median(t)) * 1e-3, 1e-12)
    w = 1.0 / np.maximum(t, floor) if relative else np.ones_like(t)
    for _ in range(4 if relative else 1):
        coef, _ = nnls(Xs * w[:, None], t * w, maxiter=50 * X.shape[1])
        w = 1.0 / np.maximum(Xs @ coef, floor)
    return (coef / scale).tolist()


def errors(pred: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """MAPE (%), R^2 and the error of the sum (%, what a throughput sees) of predictions."""
    n = len(y)
    if n == 0:
        return {"n": 0}
    mape = 100.0 * sum(abs(p - t) / t for p, t in zip(pred, y, strict=True) if t > 0) / n
    mean = sum(y) / n
    ss_res = sum((p - t) ** 2 for p, t in zip(pred, y, strict=True))
    ss_tot = sum((t - mean) ** 2 for t in y) or 1e-30
    total = 100.0 * (sum(pred) - sum(y)) / (sum(y) or 1e-30)
    return {"n": n, "mape": round(mape, 2), "r2": round(1 - ss_res / ss_tot, 4), "sum_err": round(total, 2)}


def fit_lines(fit: Mapping[str, Any], label: Callable[[str], str], flat_label: str) -> list[str]:
    """A fit record as text: one line per nested dict (``label(key): name value, ...``), then the
    scalar entries on one line after ``flat_label``."""
    lines = [f"{label(k)}: " + ", ".join(f"{a} {b}" for a, b in v.items()) for k, v in fit.items() if isinstance(v, dict)]
    flat = [f"{k} {v}" for k, v in fit.items() if not isinstance(v, dict)]
    return [*lines, f"{flat_label}: " + ", ".join(flat)] if flat else lines


# -- fingerprints ----------------------------------------------------------------------------------


def machine_fingerprint() -> dict[str, Any]:
    """CPU model, cores, OS (no torch: the twin calls this); torch details if torch is loaded."""
    fp: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.system()}
    torch = sys.modules.get("torch")
    if torch is not None:
        fp["torch"] = torch.__version__
        fp["torch_threads"] = torch.get_num_threads()
        fp["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return fp


def model_fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model part: its name and a hash of the config keys that decide its speed."""
    keys = {k: config[k] for k in MODEL_KEYS if k in config}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = config.get("_name_or_path") or config.get("model_type") or "model"
    return {"model": str(name), "model_config": digest}


def model_fingerprint_of_folder(path: str | Path) -> dict[str, Any]:
    """:func:`model_fingerprint` of a Hugging Face folder's ``config.json`` (no torch needed)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("model", f"{path}: no readable config.json ({e})") from None
    fp = model_fingerprint(cfg)
    fp["model"] = path.name
    return fp


def load_cost(path: str | Path | None = None, model: str | Path | None = None) -> CostModel:
    """The cost model in ``path`` (None: the one shipped), warning (:class:`CostModelMismatch`)
    when it was measured on another machine or, given ``model`` (a folder), for another model.

    The twin runs no torch: this process's torch threads say nothing, so they are not compared.
    """
    if path is None:
        if not DEFAULT_COST.is_file():
            raise ConfigError(
                "cost", "no cost model given and none shipped: run paradapt profile, then --cost FILE"
            )
        path = DEFAULT_COST
    expect = machine_fingerprint()
    expect.pop("torch_threads", None)
    if model is not None:
        expect["model_config"] = model_fingerprint_of_folder(model)["model_config"]
    return CostModel.load(path, expect=expect)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
