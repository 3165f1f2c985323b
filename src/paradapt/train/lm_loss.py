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

from .data import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class LearnedLogits:
    """The logits of the learned positions of a batch, flattened: ``logits`` (n, vocab), the
    token each should predict (``targets``, n) and the batch row it belongs to (``rows``, n)."""

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    batch_rows: int

    def row_losses(self) -> torch.Tensor:
        """Each batch row's summed next-token loss (float32)."""
        tok = F.cross_entropy(self.logits.float(), self.targets, reduction="none")
        return torch.zeros(self.batch_rows, dtype=tok.dtype, device=tok.device).index_add(0, self.rows, tok)

    def rows_right(self) -> torch.Tensor:
        """Per batch row, whether every learned token is the argmax (what greedy decoding would
        produce after the same prefix): a row without learned tokens counts as right."""
        wrong = self.logits.argmax(-1) != self.targets
        right = torch.ones(self.batch_rows, dtype=torch.bool, device=self.logits.device)
        right[self.rows[wrong]] = False
        return right


@contextmanager
def _head_on(model: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """While open, the model's LM head sees only the hidden states at ``mask`` (batch, length - 1):
    a pre-hook on the head gathers them, so everything around the head (the model's own forward
    hooks, routing, an element-wise transform of the logits) runs as usual."""

    def gather(module: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
            raise TypeError("the LM head was not called with the hidden states as (batch, length, hidden)")
        return (args[0][:, :-1][mask], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def head_gathers(model: nn.Module, inputs: dict) -> bool:
    """Whether the model's logits at chosen positions equal its head on those positions' hidden
    states alone, checked on ``inputs`` (one row is enough; in eval mode, without gradients;
    call it in the routing and autocast context of the training forward)."""
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head) or get_head() is None or getattr(model.config, "is_encoder_decoder", False):
        return False
    ids = inputs["input_ids"]
    everything = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(**inputs).logits[:, :-1][everything].float()
            with _head_on(model, everything):
                mine = model(**inputs).logits.float()
    except Exception as e:  # noqa: BLE001 - any failure means "use the full forward"
        log.info(
            "LM loss: %s's head cannot take gathered positions (%s); using all logits",
            type(model).__name__,
            e,
        )
        return False
    finally:
        model.train(was)
    scale = float(full.abs().max()) + 1e-6
    if full.shape != mine.shape or float((full - mine).abs().max()) > 1e-2 * scale:
        log.info(
            "LM loss: %s's logits depend on the positions around them; using all logits", type(model).__name__
        )
        return False
    return True


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


def learned_logits(model: nn.Module, inputs: dict, labels: torch.Tensor, gather: bool) -> LearnedLogits:
    """The logits of one forward at the positions whose next token is learned: the head runs on
    those positions alone when ``gather`` (from :func:`head_gathers`), else they are picked
    from the model's full logits."""
    if not gather:
        return pick(model(**inputs).logits, labels)
    mask, targets, rows = _learned(labels)
    with _head_on(model, mask):
        logits = model(**inputs).logits
    return LearnedLogits(logits, targets, rows, labels.shape[0])
