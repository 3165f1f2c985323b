"""The Runner: executes one :class:`~paradapt.serve.scheduler.ScheduledStep` as one packed forward.

Every scheduled request's tokens (prompt chunks and decodes) go back to back into one
``[1, T]`` row, attend through transformers' paged KV cache (behind
:class:`~paradapt.serve.hf_paged.PagedKV`, the one module that uses transformers' private
continuous-batching API; see docs/serving.md section 4), and each token is routed by its
request's adapter with ``pa.route(..., packed=True)``.
The Runner owns the model, the KV pages and the IO buffers; it knows nothing of policy.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import kernels
from ..checks import is_int
from ..errors import ConfigError, ParadaptError
from ..lifecycle import route
from ..state import get_state
from .hf_paged import KVState, PagedKV, lean_decode
from .layer_gemm import LayerProduct
from .lm_head import HeadProduct
from .paged_attention import DecodeAttention
from .sampling import History, SamplingParams, TokenLogprob, logprobs_of, make_generator, sample
from .scheduler import ScheduledStep


class NonFiniteLogitsError(ParadaptError):
    """A request's logits went NaN or infinite (its adapter's weights, or its prompt, drive the
    values out of range): sampling them would give garbage tokens, so the request fails alone."""

    def __init__(self, request_id: str, adapter: str | None, position: int):
        self.request_id, self.adapter = request_id, adapter
        who = "the base model" if adapter is None else f"adapter {adapter!r}"
        super().__init__(
            f"the model's logits became NaN or infinite for this request at generated token {position} "
            f"(with {who}); its output would be garbage, so it was stopped"
        )


@dataclass(eq=False)
class Sequence:
    """A running generation as the Runner sees it: its tokens, adapter and random stream."""

    id: str
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    kv: KVState | None = None
    eos: frozenset[int] = frozenset()  # what min_tokens holds back
    logprobs: list[TokenLogprob] = field(
        default_factory=list
    )  # per output token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token (first: None)
    salt: str | None = None  # the prefix cache's key for this adapter (None: not cached)
    cached: int = 0  # prompt tokens whose KV came from the prefix cache


def _adapter_kernel() -> bool:
    """Make the banks' C++ strategy a candidate (kernels.py), warning once if it cannot be built."""
    why = kernels.enable_native()
    if why is not None and not _warned:
        _warned.append(why)
        warnings.warn(f"the adapter kernel is unavailable, banks use their torch strategies ({why})", stacklevel=3)
    return why is None


_warned: list[str] = []


class Runner:
    """Model + paged KV cache + IO buffers; ``execute(step)`` runs one packed step.

    ``num_blocks`` pages of ``page_size`` tokens hold the KV of every running request; the
    scheduler must reserve in the same units (``kv_block=runner.kv_block``,
    ``kv_tokens=runner.kv_tokens``) so that allocation never fails. ``max_batch_tokens`` bounds one step's tokens (the
    scheduler's ``token_budget``). ``lm_head_gemm``: how the LM head multiplies
    (:class:`~paradapt.serve.lm_head.HeadProduct`, packed for ``max_rows`` rows, the most a step
    samples). ``layer_gemm``: how the other linear layers multiply
    (:class:`~paradapt.serve.layer_gemm.LayerProduct`). ``check_adapter_weights``: route without ``fixed_weights``
    (see :class:`~paradapt.serve.core.EngineConfig`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        page_size: int = 16,
        num_blocks: int = 256,
        max_batch_tokens: int = 256,
        decode_attention: str = "auto",
        check_adapter_weights: bool = False,
        lm_head_gemm: str = "auto",
        layer_gemm: str = "auto",
        max_rows: int = 32,
    ):
        for name, v, lo in (
            ("page_size", page_size, 4),
            ("num_blocks", num_blocks, 1),
            ("max_batch_tokens", max_batch_tokens, 1),
        ):
            if not is_int(v) or v < lo:
                raise ConfigError(name, f"must be an integer >= {lo}, got {v!r}")
        self.model = model
        self.check_adapter_weights = check_adapter_weights
        self.page_size = page_size
        self.kv = PagedKV(
            model, page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens
        )
        self.max_batch_tokens = self.kv.max_batch_tokens
        if self.kv.attention_kinds != ["full_attention"]:
            raise ConfigError(
                "model",
                f"only full-attention models are served for now, this one has {self.kv.attention_kinds}",
            )
        self.kv_block = self.kv.kv_block  # allocation unit: the scheduler reserves in these
        self.kv_tokens = self.kv.kv_tokens
        self.decode_attention = DecodeAttention(decode_attention)
        heads_kv, dim, dtype, device = self.kv.kv_layout()
        self.decode_attention.warm_up(model.config.num_attention_heads, heads_kv, dim, dtype, device)
        self.adapter_kernel = device.type == "cpu" and _adapter_kernel()
        self.head_product = HeadProduct(lm_head_gemm, rows=max_rows)
        self.head_product.prepare(model)
        self.layer_product = LayerProduct(layer_gemm)
        self.layer_product.prepare(model)
        self._seqs: dict[str, Sequence] = {}
        self._nonfinite: list[NonFiniteLogitsError] = []  # rows dropped since the last take_nonfinite

    # -- requests -----------------------------------------------------------------
    def add(
        self,
        request_id: str,
        prompt: list[int],
        adapter: str | None,
        params: SamplingParams,
        eos: frozenset[int] = frozenset(),
        salt: str | None = None,
    ) -> Sequence:
        """Start tracking a request (its KV pages are allocated as its tokens run); ``eos``: the
        ids that end it, held back while it has fewer than ``params.min_tokens``.

        ``salt``: the prefix cache's key for the request's adapter, in the version it is served
        in (None: the request neither reads nor fills the cache). Requests with the same salt
        share the KV pages of a common prompt start (:meth:`PagedKV.match_prefix`); the
        sequence's ``cached`` says how many prompt tokens it skips, where its prefill starts. A
        request asking for prompt log-probabilities runs its whole prompt (skipped tokens would
        have no logits) but still fills the cache.
        """
        if request_id in self._seqs:
            raise ConfigError("id", f"request id {request_id!r} is already running")
        kv = self.kv.new_request(request_id, prompt, params.max_new_tokens)
        seq = Sequence(request_id, list(prompt), adapter, params, make_generator(params), kv=kv, eos=eos, salt=salt)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs.append(None)  # the first prompt token has no context to score it
        elif salt is not None:
            seq.cached = self.kv.match_prefix(kv, salt)
        self._seqs[request_id] = seq
        return seq

    def free(self, request_id: str) -> None:
        """Forget a finished or cancelled request and give its KV pages back."""
        if self._seqs.pop(request_id, None) is not None:
            self.kv.free(request_id)

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    def pages_in_use(self, request_id: str | None = None) -> int:
        """KV pages held by one request (or by all)."""
        return self.kv.pages_in_use(request_id)

    # -- one step -----------------------------------------------------------------
    def execute(self, step: ScheduledStep) -> dict[str, int]:
        """Run ``step``'s chunks and decodes in one packed forward; returns ``{request id: new token}``
        for every request that samples this step (last prompt chunks and decodes)."""
        batch = self._batch(step)
        if not batch:
            return {}
        num_q = sum(len(toks) for _, toks, _ in batch)
        if num_q > self.max_batch_tokens:
            raise ConfigError(
                "token_budget",
                f"the step has {num_q} tokens, over the Runner's max_batch_tokens={self.max_batch_tokens}",
            )
        kw = self.kv.step_inputs([(seq.kv, toks, samples) for seq, toks, samples in batch])
        samplers = [seq for seq, _, samples in batch if samples]
        keep = self.kv.sampler_rows(kw, len(samplers))  # the samplers' last tokens, in batch order
        scored = self._scored_prompt_rows(step, batch)
        if scored:  # only requests that asked for prompt log-probabilities keep all their rows
            keep = torch.cat([keep, torch.tensor([p for _, _, p in scored], device=keep.device)])
        with (
            torch.no_grad(),
            self._routes(batch),
            lean_decode(keep.device, self.decode_attention.attend),
            self.head_product.active(),
            self.layer_product.active(),
        ):
            logits = self.model(**kw, logits_to_keep=keep).logits[0]  # LM head on those rows only
        if scored:
            self._record_prompt_logprobs(scored, logits[len(samplers) :])
            logits = logits[: len(samplers)]
        samplers, logits = self._finite_rows(samplers, logits)
        self._fill_prefix_cache(batch)
        histories = [None if s.params.plain else History(s.prompt, s.output, s.eos) for s in samplers]
        tokens = sample(logits, [s.params for s in samplers], [s.generator for s in samplers], histories)
        asked = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
        if asked:
            rows = logits[torch.tensor(asked, device=logits.device)]
            lps = logprobs_of(rows, [tokens[i] for i in asked], [samplers[i].params.logprobs for i in asked])
            for i, lp in zip(asked, lps, strict=True):
                samplers[i].logprobs.append(lp)
        for seq, tok in zip(samplers, tokens, strict=True):
            seq.output.append(tok)
        return {seq.id: tok for seq, tok in zip(samplers, tokens, strict=True)}

    def _finite_rows(self, samplers: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """The samplers whose logits row is usable, and those rows. A row with NaN or +inf (or
        only -inf) is not sampled (argmax of NaN is garbage, multinomial raises): its request is
        recorded for :meth:`take_nonfinite`, and the other rows go on untouched."""
        if not samplers:
            return samplers, logits
        if torch.isfinite(logits.sum()):  # one pass: every value finite (a NaN or an inf would show)
            return samplers, logits
        # NaN or +inf anywhere, or nothing above -inf (a model may mask tokens with -inf)
        bad = logits.isnan().any(-1) | logits.isposinf().any(-1) | logits.isneginf().all(-1)
        ok = (~bad).tolist()
        if all(ok):
            return samplers, logits
        for seq, fine in zip(samplers, ok, strict=True):
            if not fine:
                self._nonfinite.append(NonFiniteLogitsError(seq.id, seq.adapter, len(seq.output)))
        keep = [i for i, fine in enumerate(ok) if fine]
        rows = logits[torch.tensor(keep, dtype=torch.long, device=logits.device)]
        return [samplers[i] for i in keep], rows

    def _fill_prefix_cache(self, batch) -> None:
        """Offer the pages this step filled to the prefix cache; not those of a request whose
        logits went non-finite (its KV may be garbage, and must not reach another request)."""
        bad = {e.request_id for e in self._nonfinite}
        for seq, _, _ in batch:
            if seq.salt is not None and seq.id not in bad:
                self.kv.mark_complete(seq.kv, seq.output, seq.salt)

    def take_nonfinite(self) -> list[NonFiniteLogitsError]:
        """The requests whose logits were not finite since the last call (each one's error);
        the engine fails them. Their sequences stay until freed."""
        out, self._nonfinite = self._nonfinite, []
        return out

    def _scored_prompt_rows(self, step: ScheduledStep, batch) -> list[tuple[Sequence, int, int]]:
        """(sequence, prompt index scored, packed-row position whose logits score it) for the
        prompt chunks of requests asking for prompt log-probabilities: position ``p`` of the
        prompt predicts token ``p + 1``; the last prompt position is the sampler row."""
        out, offset = [], 0
        chunks = {c.request_id: c for c in step.prefills}
        for seq, toks, _ in batch:
            c = chunks.get(seq.id)
            if c is not None and seq.params.prompt_logprobs is not None and not seq.output:
                for j in range(c.length):
                    if c.start + j + 1 < len(seq.prompt):
                        out.append((seq, c.start + j + 1, offset + j))
            offset += len(toks)
        return out

    @staticmethod
    def _record_prompt_logprobs(scored, logits: torch.Tensor) -> None:
        tokens = [seq.prompt[i] for seq, i, _ in scored]
        lps = logprobs_of(logits, tokens, [seq.params.prompt_logprobs for seq, _, _ in scored])
        for (seq, i, _), lp in zip(scored, lps, strict=True):
            if i == len(seq.prompt_logprobs):  # in order, once (a recomputed prefill scores nothing new)
                seq.prompt_logprobs.append(lp)

    def _batch(self, step: ScheduledStep) -> list[tuple[Sequence, list[int], bool]]:
        """(sequence, tokens to run, samples a token) in step order: prompt chunks, then decodes."""
        out = []
        for c in step.prefills:
            seq = self._require(c.request_id)
            out.append((seq, seq.prompt[c.start : c.start + c.length], c.last))
        for rid in step.decodes:
            seq = self._require(rid)
            if not seq.output:
                raise ParadaptError(f"request {rid!r} is scheduled to decode before its prompt finished")
            out.append((seq, [seq.output[-1]], True))
        return out

    def _routes(self, batch):
        """Per-token routes for the packed row (nothing to route on a model without adapters)."""
        adapters = [seq.adapter for seq, _, _ in batch]
        if get_state(self.model) is None:
            if any(a is not None for a in adapters):
                raise ParadaptError(f"adapters {sorted({a for a in adapters if a})} are not on the model")
            return contextlib.nullcontext()
        # fixed_weights: the engine serves adapters as read from their files; nothing edits them
        # in place while it runs, so the banks skip their per-step version check
        lengths = [len(t) for _, t, _ in batch]
        return route(
            self.model, adapters, packed=True, lengths=lengths, fixed_weights=not self.check_adapter_weights
        )

    def _require(self, request_id: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None:
            raise ParadaptError(
                f"request {request_id!r} is scheduled but unknown to the Runner (call add first)"
            )
        return seq
