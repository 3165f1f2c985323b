"""The next-token loss on the learned tokens only: the LM head runs on the positions that count.

Chat and completion rows learn a few answer tokens after a long prompt (an SST-2 conversation:
about 4 of 100 tokens), yet a causal LM's forward puts every position through the LM head, and
on a small model with a large vocabulary that head is a large share of the work (SmolLM2-135M:
576 x 49,152, a fifth of the forward's multiply-adds) and most of the activation memory (the
float logits of a 16 x 100 batch are 315 MB, and their gradient as much again). So a pre-hook on
the head hands it only the hidden states of the positions whose next token is learned; the
rest of the model's forward, its hooks and routing run unchanged. Measured on SmolLM2 with a
parallel adapter, 16 rows x 100 tokens, 4 learned a row, one thread: 1.44x faster per training
step (``benchmarks/prefill_paths.py``). PEFT and transformers' Trainer compute every
position's logits; the loss is the same up to float rounding (tested).

When every token is learned (completions, pre-training-style data) the learned positions are
most of the batch, and their float logits dominate the step's memory (8 x 128 tokens of SmolLM2:
201 MB of logits, and the cross-entropy's softmax and the gradient as much again each). Above
:data:`CHUNK_BYTES` of logits the head and the loss run in chunks of positions under activation
checkpointing instead: each chunk's logits live only while its loss is taken and again while its
gradient is, as torchtune's chunked cross-entropy and Liger's fused linear cross-entropy do. The
head is then called outside the model's forward, which :func:`head_checks` checks once per model.

This holds when nothing after the head mixes positions: an element-wise transform of the
logits (Gemma 2's soft-capping, Cohere's ``logit_scale``) is fine, a model whose forward
reshapes or reduces its logits over the sequence is not. Rather than keep a list,
:func:`head_gathers` checks each model once, on one row, against its full logits, and the loss
falls back to the full forward if they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

#: Logits of the learned positions above this many bytes (as float32) are computed in chunks of
#: about this size (:meth:`LearnedLogits.row_losses`); below it, in one piece as before.
CHUNK_BYTES = 32 * 2**20

log = logging.getLogger(__name__)


@dataclass
class LearnedLogits:
    """The logits of the learned positions of a batch, flattened: ``logits`` (n, vocab), the
    token each should predict (``targets``, n) and the batch row it belongs to (``rows``, n).

    Chunked (``head`` set): ``logits`` is None and ``hidden`` (n, hidden size) holds the head's
    input at those positions; the head runs on ``chunk`` positions at a time when asked.
    """

    logits: torch.Tensor | None
    targets: torch.Tensor
    rows: torch.Tensor
    batch_rows: int
    hidden: torch.Tensor | None = None
    head: nn.Module | None = None
    chunk: int = 0

    def row_losses(self) -> torch.Tensor:
        """Each batch row's summed next-token loss (float32)."""
        tok = self._token_losses()
        return torch.zeros(self.batch_rows, dtype=tok.dtype, device=tok.device).index_add(0, self.rows, tok)

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(hidden states, targets) of ``chunk`` positions at a time (chunked only)."""
        for s in range(0, len(self.targets), self.chunk):
            yield self.hidden[s : s + self.chunk], self.targets[s : s + self.chunk]

    def _token_losses(self) -> torch.Tensor:
        if self.head is None:
            return _cross_entropy(self.logits, self.targets)
        parts = []
        for h, t in self._chunks():
            if torch.is_grad_enabled():  # keep only h: the logits are recomputed for backward
                parts.append(checkpoint(_head_loss, self.head, h, t, use_reentrant=False))
            else:
                parts.append(_head_loss(self.head, h, t))
        return torch.cat(parts) if parts else self.hidden.new_zeros(0, dtype=torch.float32)

    def rows_right(self) -> torch.Tensor:
        """Per batch row, whether every learned token is the argmax (what greedy decoding would
        produce after the same prefix): a row without learned tokens counts as right."""
        wrong = self._argmax() != self.targets
        right = torch.ones(self.batch_rows, dtype=torch.bool, device=self.targets.device)
        right[self.rows[wrong]] = False
        return right

    def _argmax(self) -> torch.Tensor:
        if self.head is None:
            return self.logits.argmax(-1)
        with torch.no_grad():
            return torch.cat([self.head(h).argmax(-1) for h, _ in self._chunks()] or [self.targets[:0]])


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One chunk: the head on ``hidden`` and each position's loss (a checkpointed unit)."""
    return _cross_entropy(head(hidden), targets)


@contextmanager
def _head_on(model: nn.Module, mask: torch.Tensor, keep: list | None = None) -> Iterator[None]:
    """While open, the model's LM head sees only the hidden states at ``mask`` (batch, length - 1):
    a pre-hook on the head gathers them, so everything around the head (the model's own forward
    hooks, routing, an element-wise transform of the logits) runs as usual. With ``keep``, the
    gathered states are appended to it and the head gets none of them (chunked: it runs later)."""

    def gather(module: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            raise TypeError("the LM head was not called with the hidden states as (batch, length, hidden)")
        picked = args[0][:, :-1][mask]
        if keep is not None:
            keep.append(picked)
            picked = picked[:0]
        return (picked, *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def head_checks(model: nn.Module, inputs: dict) -> tuple[bool, bool]:
    """``(gathers, alone)``, checked on ``inputs`` (one row is enough; in eval mode, without
    gradients; call it in the routing and autocast context of the training forward), from one
    full forward, one gathered forward and one call of the head:

    - ``gathers``: the model's logits at chosen positions equal its head on those positions'
      hidden states alone (nothing after the head mixes positions);
    - ``alone``: the head called on its own, outside the model's forward, gives them too
      (nothing after it changes them, e.g. Gemma 2's soft-capping), so the loss may run it in
      chunks (:data:`CHUNK_BYTES`). Never true without ``gathers``.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head) or get_head() is None or getattr(model.config, "is_encoder_decoder", False):
        return False, False
    head = get_head()
    ids = inputs["input_ids"]
    everything = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    seen: list[torch.Tensor] = []  # the head's input in the gathered forward
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(**inputs).logits[:, :-1][everything].float()
            with _head_on(model, everything):
                handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
                try:
                    mine = model(**inputs).logits.float()
                finally:
                    handle.remove()
            alone = _head_alone(head, seen[0])
    except Exception as e:  # noqa: BLE001 - any failure means "use the full forward"
        log.info(
            "LM loss: %s's head cannot take gathered positions (%s); using all logits",
            type(model).__name__,
            e,
        )
        return False, False
    finally:
        model.train(was)
    scale = float(full.abs().max()) + 1e-6
    if full.shape != mine.shape or float((full - mine).abs().max()) > 1e-2 * scale:
        log.info(
            "LM loss: %s's logits depend on the positions around them; using all logits", type(model).__name__
        )
        return False, False
    return True, alone is not None and full.shape == alone.shape and bool(
        torch.allclose(full, alone, rtol=1e-4, atol=1e-5)
    )


def _head_alone(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The head's logits on ``hidden`` called on its own; None if it cannot be (do not chunk)."""
    try:
        return head(hidden).float()
    except Exception:  # noqa: BLE001 - any failure means "do not chunk"
        return None


def head_gathers(model: nn.Module, inputs: dict) -> bool:
    """:func:`head_checks`' ``gathers``: the LM head may run on the learned positions alone."""
    return head_checks(model, inputs)[0]


def _chunk_rows(model: nn.Module, n: int) -> int:
    """Positions per chunk when ``n`` learned positions' float logits exceed :data:`CHUNK_BYTES`,
    else 0 (one piece). A head with hooks of its own (an adapter on it) is never chunked: its
    recompute in backward would run after the forward's routing has closed."""
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    if n * vocab * 4 <= CHUNK_BYTES or head._forward_hooks or head._forward_pre_hooks:
        return 0
    return max(1, CHUNK_BYTES // (vocab * 4))


def _learned(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask over positions 0..length-2, their targets, their rows): position t predicts t+1."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(target)[mask]
    return mask, target[mask], rows


def pick(logits: torch.Tensor, labels: torch.Tensor) -> LearnedLogits:
    """The learned positions of every position's ``logits`` (batch, length, vocab)."""
    mask, targets, rows = _learned(labels)
    return LearnedLogits(logits[:, :-1][mask], targets, rows, labels.shape[0])


def learned_logits(
    model: nn.Module, inputs: dict, labels: torch.Tensor, gather: bool, chunk: bool = False
) -> LearnedLogits:
    """The logits of one forward at the positions whose next token is learned: the head runs on
    those positions alone when ``gather`` (:func:`head_checks`' ``gathers``), else they are picked
    from the model's full logits. With ``chunk`` too (:func:`head_checks`' ``alone``), many learned
    positions leave the head for the loss to run in chunks (:data:`CHUNK_BYTES`)."""
    if not gather:
        return pick(model(**inputs).logits, labels)
    mask, targets, rows = _learned(labels)
    rows_per_chunk = _chunk_rows(model, int(mask.sum())) if chunk else 0
    if rows_per_chunk:
        kept: list[torch.Tensor] = []
        with _head_on(model, mask, keep=kept):
            model(**inputs)
        head = model.get_output_embeddings()
        return LearnedLogits(None, targets, rows, labels.shape[0], kept[0], head, rows_per_chunk)
    with _head_on(model, mask):
        logits = model(**inputs).logits
    return LearnedLogits(logits, targets, rows, labels.shape[0])
