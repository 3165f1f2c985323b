"""Which rows go together: the train/eval split, each epoch's order, and micro-batches by length."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from ...errors import ConfigError
from .records import DataError, source_of


def split(records: Sequence[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split into (train, eval) by a seeded shuffle; each part keeps file order.

    Split records (documents) before tokenizing, so packed blocks never straddle the two.
    The eval part holds ``round(n * eval_fraction)`` records, at least 1 and at most n - 1.
    Use a separate eval file instead by loading it with its own :class:`DataSpec`.
    """
    if (
        not isinstance(eval_fraction, (int, float))
        or isinstance(eval_fraction, bool)
        or not 0 < eval_fraction < 1
    ):
        raise ConfigError(
            "eval_fraction", f"must be a number between 0 and 1 (exclusive), got {eval_fraction!r}"
        )
    n = len(records)
    if n < 2:
        path, _ = source_of(records[0]) if records else ("<records>", None)
        raise DataError(
            path,
            None,
            f"cannot split {n} record(s) into train and eval; give an eval file (or a txt_separator)",
        )
    k = min(max(round(n * eval_fraction), 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:k])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


def seeded_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch``: a function of (seed, epoch) only.

    A resumed run recomputes the same order and skips the examples already seen.
    """
    gen = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=gen).tolist()


def length_buckets(
    lengths: Sequence[int],
    parts: int,
    max_tokens: int | None = None,
    forward_cost: float | None = None,
) -> list[list[int]]:
    """Row indices grouped into micro-batches that are padded as little as possible.

    A micro-batch pads every row to its longest, so its cost is ``rows x longest row``
    ("padded tokens"). The rows are sorted by length and cut into contiguous runs by an exact
    dynamic programme over the cut points; some optimal partition into g groups is always
    such a run of the sorted rows, so no other grouping into g micro-batches pads less.

    * ``forward_cost=None``: exactly ``parts`` micro-batches (fewer only when there are fewer rows);
    * ``forward_cost=c``: at most ``parts`` micro-batches, as many as minimise padded tokens +
      ``c`` x micro-batches (``c``: the fixed cost of one forward and backward, in tokens);
    * ``max_tokens``: no micro-batch holds more padded tokens (more micro-batches when needed).
      A row longer than ``max_tokens`` is an error (the trainer checks the data up front).

    Each micro-batch lists its rows in their original order (so the result is deterministic).
    """
    n = len(lengths)
    if n == 0:
        return []
    if parts < 1:
        raise ConfigError("micro_batches", f"must be >= 1, got {parts}")
    longest = max(lengths)
    if max_tokens is not None and longest > max_tokens:
        raise ConfigError(
            "micro_batch_tokens", f"a row of {longest} tokens does not fit a budget of {max_tokens}"
        )
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    width = torch.tensor([0] + [lengths[i] for i in order], dtype=torch.float64)  # width[j]: row j-1
    first = torch.arange(n + 1, dtype=torch.float64).unsqueeze(1)
    stop = torch.arange(n + 1, dtype=torch.float64).unsqueeze(0)
    cost = (stop - first) * width.unsqueeze(0)  # cost[i, j]: sorted rows i..j-1 in one micro-batch
    ok = stop > first
    if max_tokens is not None:
        ok &= cost <= max_tokens
    cost = torch.where(ok, cost, torch.full_like(cost, math.inf))
    real = float(sum(lengths))
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices: list[torch.Tensor] = []  # per group count g: the best start of the g-th group, per end
    parts = min(parts, n)
    chosen, score = 0, math.inf  # the group count kept, and its padded tokens + forward costs
    while True:
        best, arg = (best.unsqueeze(1) + cost).min(0)
        choices.append(arg)
        g, total = len(choices), float(best[n])
        if not math.isfinite(total):
            continue  # max_tokens needs more micro-batches
        here = total + (forward_cost or 0.0) * g
        if here < score or forward_cost is None:  # without a cost: the last count, ``parts``
            chosen, score = g, here
        # more micro-batches cannot pad less than the real tokens: stop once they cannot win
        if g >= parts or (forward_cost is not None and real + forward_cost * (g + 1) >= score):
            break
    cuts, end = [n], n
    for arg in reversed(choices[:chosen]):
        end = int(arg[end])
        cuts.append(end)
    cuts.reverse()
    return [sorted(order[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
