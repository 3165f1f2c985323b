"""Per-request sampling: greedy, temperature, top-k, top-p, with one seeded generator per request.

Each request draws from its own ``torch.Generator``, so its tokens depend only on its own
logits and seed, never on which requests share its batch. Stop strings and EOS are the
engine's business (they need the tokenizer and the request's text so far).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import is_int
from ..errors import ConfigError

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature under it samples as argmax
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature == 0`` is greedy (argmax).

    ``top_k`` 0 and ``top_p`` 1.0 disable those filters. ``seed`` None draws a fresh seed,
    so the request is random but still independent of its batch-mates.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _number("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _integer("top_k", self.top_k, 0)
        _integer("max_new_tokens", self.max_new_tokens, 1)
        if self.seed is not None:
            _integer("seed", self.seed, 0)
            if self.seed >= SEED_LIMIT:
                raise ConfigError("seed", f"must be below 2**64, got {self.seed}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ConfigError("stop", f"must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """Temperatures below ``GREEDY_BELOW`` are greedy: dividing logits by them overflows."""
        return self.temperature < GREEDY_BELOW

    def eos_ids(self) -> frozenset[int]:
        """Token ids that end the request (empty when ``ignore_eos``)."""
        if self.ignore_eos or self.eos_token_id is None:
            return frozenset()
        e = self.eos_token_id
        return frozenset([e] if isinstance(e, int) else e)


def _number(name: str, v: object, ok, what: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
        raise ConfigError(name, f"must be a number {what}, got {v!r}")


def _integer(name: str, v: object, minimum: int) -> None:
    if not is_int(v) or v < minimum:
        raise ConfigError(name, f"must be an integer >= {minimum}, got {v!r}")


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (None for greedy requests, which need none)."""
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (``logits: [V]``, float)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop = before >= top_p  # keeps the smallest prefix whose mass reaches top_p
        drop[0] = False  # and at least the most likely token (a top_p under float32's range drops all)
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one request's logits ``[V]``."""
    if params.greedy:
        return int(logits.argmax())
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = scaled.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits: [n, V]``, row ``i`` with ``params[i]`` and ``generators[i]``.

    Greedy rows take one batched argmax; sampled rows draw one by one from their own streams.
    """
    if logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(params)} params, {len(generators)} generators")
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            out[i] = sample_one(logits[i], p, g)
    return out
