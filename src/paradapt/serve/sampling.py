"""Per-request sampling: greedy, temperature, top-k, top-p, penalties, logit bias, min_tokens,
log-probabilities, with one seeded generator per request.

Each request draws from its own ``torch.Generator`` and its logits are processed from its own
tokens only, so its tokens depend only on its own logits, history and seed, never on which
requests share its batch. Stop strings and EOS are the engine's business (they need the
tokenizer and the request's text so far); the engine passes the EOS ids ``min_tokens`` holds back.

Log-probabilities are those of the model's distribution: ``log_softmax`` of the raw logits,
before penalties, bias and temperature (vLLM's default ``raw_logprobs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import is_int
from ..errors import ConfigError

MAX_LOGPROBS = 20  # OpenAI's bound on top log-probabilities per token
MAX_CACHE_SALT = 1024  # characters of a cache_salt (vLLM suggests 43: 256 bits in base64)
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # top alternatives per generated token (0: the chosen one's only)
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    # vLLM's: requests share prefix-cache pages only with requests of the same salt (one per
    # tenant: another tenant cannot learn from cache hits what it sent)
    cache_salt: str | None = None

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
        _number("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        _number("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        _number("repetition_penalty", self.repetition_penalty, lambda v: 0 < v <= 10, "in (0, 10]")
        _integer("min_tokens", self.min_tokens, 0)
        salt = self.cache_salt
        if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_CACHE_SALT):
            raise ConfigError("cache_salt", f"must be a non-empty string of at most {MAX_CACHE_SALT} characters")
        if self.min_tokens > self.max_new_tokens:
            raise ConfigError("min_tokens", f"{self.min_tokens} is over max_tokens ({self.max_new_tokens})")
        bias = tuple((int(t), float(b)) for t, b in dict(self.logit_bias).items())
        for t, b in bias:
            if t < 0 or not -100 <= b <= 100:
                raise ConfigError("logit_bias", f"token {t}: ids must be >= 0 and biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ConfigError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below ``GREEDY_BELOW`` are greedy: dividing logits by them overflows."""
        return self.temperature < GREEDY_BELOW

    @property
    def plain(self) -> bool:
        """True when nothing changes the raw logits before sampling (the batched-argmax fast path)."""
        return (
            self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repetition_penalty == 1
            and self.min_tokens == 0
            and not self.logit_bias
        )

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


@dataclass(frozen=True)
class History:
    """What a row's logit processing reads besides its logits: its prompt, its tokens so far,
    and the ids that end it (held back while fewer than ``min_tokens`` were generated)."""

    prompt: list[int]
    output: list[int]
    eos: frozenset[int] = frozenset()


def process_logits(logits: torch.Tensor, params: SamplingParams, history: History | None) -> torch.Tensor:
    """One row's logits ``[V]`` after min_tokens, logit_bias and the penalties (vLLM's order
    and definitions: repetition over prompt and output, presence and frequency over the output)."""
    if params.plain:
        return logits
    out = logits.float().clone()
    vocab = out.shape[-1]
    h = history or History([], [])
    if params.min_tokens and len(h.output) < params.min_tokens:
        ids = [t for t in h.eos if 0 <= t < vocab]
        if ids:
            out[ids] = float("-inf")
    for t, b in params.logit_bias:
        if t < vocab:
            out[t] += b
    if params.repetition_penalty != 1 and (h.prompt or h.output):
        ids = sorted({t for t in (*h.prompt, *h.output) if 0 <= t < vocab})
        seen = torch.tensor(ids, dtype=torch.long, device=out.device)
        v = out[seen]
        out[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and h.output:
        output = torch.tensor([t for t in h.output if 0 <= t < vocab], dtype=torch.long, device=out.device)
        counts = torch.bincount(output, minlength=vocab)[:vocab]
        out -= params.frequency_penalty * counts.to(out.dtype)
        out -= params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[History | None] | None = None,
) -> list[int]:
    """One token per row of ``logits: [n, V]``, row ``i`` with ``params[i]``, ``generators[i]``
    and (for penalties, bias, min_tokens) ``histories[i]``.

    Plain greedy rows take one batched argmax; the others are processed and drawn one by one
    from their own streams, so a row's token never depends on its batch-mates.
    """
    if logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(f"{logits.shape[0]} logit rows, {len(params)} params, {len(generators)} generators")
    histories = histories if histories is not None else [None] * len(params)
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.greedy and p.plain:
            continue
        row = process_logits(logits[i], p, histories[i])
        out[i] = int(row.argmax()) if p.greedy else sample_one(row, p, g)
    return out


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the ``top`` most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token's log-probability and its ``tops[i]`` best alternatives
    (``logits: [n, V]``, raw: the model's distribution, as vLLM's default)."""
    if not tokens:
        return []
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    k = min(max(tops), lp.shape[-1])
    vals, ids = lp.topk(k, dim=-1) if k else (None, None)
    out = []
    for i, (tok, top) in enumerate(zip(tokens, tops, strict=True)):
        alts = tuple(zip(ids[i, :top].tolist(), vals[i, :top].tolist(), strict=True)) if top else ()
        out.append(TokenLogprob(tok, chosen[i], alts))
    return out
