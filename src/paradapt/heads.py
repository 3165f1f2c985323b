"""Task heads that belong to an adapter: a classifier trained with it and saved in its folder.

``logits = dropout(pool(H, mask)) W^T + b``, with ``H`` the base model's last
hidden states and ``pool`` one of

- ``mean``: average over real (unmasked) tokens, what sentence-transformers
  encoders such as all-MiniLM-L6-v2 were trained with;
- ``cls``: the first token (BERT's ``[CLS]``);
- ``last``: the last real token, the usual choice for decoders (left or right padding).

The head lives in the adapter's module (``model.paradapt[name].head``), so
``save_adapter`` / ``load_adapter`` carry it with the adapter weights, and the
label names travel in ``adapter_config.json`` (``head={"labels": [...]}``).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterNotFoundError, RoutingError
from .state import require_state


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """One vector per row from ``hidden: [B, T, d]`` and ``mask: [B, T]`` (1 = real token)."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        t = mask.shape[1]
        pos = torch.arange(t, device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), pos, -1).max(dim=1).values.clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class ClassificationHead(nn.Module):
    """Pool, dropout, linear: the classifier of one adapter."""

    def __init__(self, hidden: int, labels: list, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        self.labels = list(labels)
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(hidden, len(self.labels))
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = pool(hidden, mask, self.pooling).to(self.out.weight.dtype)
        return self.out(self.dropout(x))


def head_of(model: nn.Module, name: str) -> ClassificationHead:
    st = require_state(model)
    st.record(name)
    head = getattr(st.container[name], "head", None)
    if head is None:
        raise AdapterNotFoundError(f"adapter {name!r} has no classification head (add it with head={{...}})")
    return head


def classify(
    model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, rows: str | list[str]
) -> torch.Tensor:
    """Logits per row from each row's adapter head (rows: one name, or one name per row).

    Heads of a mixed batch may have different label counts, so rows are padded with
    ``-inf`` to the widest head; ``logits[i, :len(labels_i)]`` are row i's.
    """
    names = [rows] * hidden.shape[0] if isinstance(rows, str) else list(rows)
    if len(names) != hidden.shape[0]:
        raise RoutingError(f"classify: {len(names)} adapter names for {hidden.shape[0]} rows")
    heads = {n: head_of(model, n) for n in dict.fromkeys(names)}
    if len(heads) == 1:
        return next(iter(heads.values()))(hidden, mask)
    width = max(len(h.labels) for h in heads.values())
    out = hidden.new_full((hidden.shape[0], width), float("-inf"), dtype=torch.float32)
    for n, head in heads.items():
        idx = torch.tensor([i for i, m in enumerate(names) if m == n], device=hidden.device)
        sub_mask = mask.index_select(0, idx) if mask is not None else None
        logits = head(hidden.index_select(0, idx), sub_mask)
        out[idx, : logits.shape[1]] = logits.float()
    return out
