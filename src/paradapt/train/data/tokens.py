"""Tokenizing normalised records into a :class:`TokenizedDataset`, and padding its examples into batches.

Nothing here needs a model: only its tokenizer.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from ...checks import is_int
from ...errors import ConfigError, ParadaptError
from .chat import render_chats
from .labels import LabelMap
from .records import IGNORE_INDEX, DataError, infer_task, source_of
from .spec import TASKS, check_choice


class TokenizedDataset(Dataset):
    """Examples as dicts of int lists, ready for :func:`collate`.

    ``task`` is "lm", "completion", "classification" or "chat"; ``labels`` the :class:`LabelMap`
    (classification; for chat rows made from labelled rows, the answer words) or None; ``num_truncated`` how many records were cut to ``max_length``;
    ``num_dropped`` how many were left out (completion prompts that filled ``max_length``);
    ``pad_id`` the id :func:`collate` pads ``input_ids`` with.
    """

    def __init__(
        self,
        examples: list[dict],
        task: str,
        labels: LabelMap | None = None,
        num_truncated: int = 0,
        num_dropped: int = 0,
        pad_id: int | None = None,
        max_length: int | None = None,
    ):
        self.examples = examples
        self.task = task
        self.labels = labels
        self.num_truncated = num_truncated
        self.num_dropped = num_dropped
        self.pad_id = pad_id
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def num_tokens(self) -> int:
        """Tokens in the data set (real tokens, no padding)."""
        return sum(len(e["input_ids"]) for e in self.examples)

    def collate_fn(self, padding_side: str = "right") -> Callable[[list[dict]], dict]:
        """A ``collate_fn`` for ``DataLoader`` that pads with this data set's ``pad_id``."""
        if self.pad_id is None:
            raise ParadaptError("this data set has no pad_id; pass one to collate()")
        return functools.partial(collate, pad_id=self.pad_id, padding_side=padding_side)


def pad_id_of(tokenizer: Any, pad_id: int | None = None) -> int:
    """``pad_id`` if given, else the tokenizer's pad token, else unk, else eos.

    Padded positions are masked out (attention 0, label -100), so the id only needs to be a
    valid embedding row; stories260K has no pad token and pads with ``<unk>`` (0).
    """
    if pad_id is not None:
        return int(pad_id)
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError("pad_id", "the tokenizer has no pad, unk or eos token; set pad_id")


def _resolve_max_length(tokenizer: Any, max_length: int | None) -> int:
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            return limit
        raise ConfigError("max_length", "the tokenizer sets no model_max_length; set max_length")
    if not is_int(max_length) or max_length < 2:
        raise ConfigError("max_length", f"must be an integer >= 2, got {max_length!r}")
    return max_length


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool, **kw: Any) -> dict:
    """Batch-encode without padding; ``verbose=False`` because we report truncation ourselves."""
    if not texts:
        return {"input_ids": []}
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False, **kw)


def tokenize(
    records: Sequence[dict],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    task: str | None = None,
    labels: LabelMap | None = None,
    packing: bool = True,
    add_eos: bool = True,
    pad_id: int | None = None,
) -> TokenizedDataset:
    """Tokenize normalised records with the model's own tokenizer.

    * classification: ``input_ids``/``attention_mask`` (+``token_type_ids`` when the tokenizer
      gives them) truncated to ``max_length`` by the tokenizer (special tokens kept), ``labels``
      the class id from ``labels`` (built from ``records`` when None: pass the training map
      when tokenizing an eval set);
    * lm: each document as the tokenizer encodes it (BOS if it adds one) plus EOS (``add_eos``);
      ``packing=True`` concatenates them and cuts blocks of exactly ``max_length`` (the last
      partial block is dropped unless it is the only one), ``packing=False`` truncates each
      document. ``labels`` equal ``input_ids`` (models shift them);
    * completion: prompt (with the tokenizer's special tokens) + completion (+EOS), labels -100
      on the prompt. Each part is tokenized alone, so put the separating space at the start of
      the completion. Over-long examples are cut at the end; one whose prompt fills
      ``max_length`` has nothing left to learn and is dropped;
    * chat: the tokenizer's chat template, labels -100 outside the assistant's answers
      (:func:`.chat.render_chats`; a conversation over ``max_length`` fails naming its line, and
      ``add_eos`` does not apply: the template ends each turn). ``labels`` are the answer words
      when the records came from labelled rows (eval accuracy), else None.

    Truncation is reported by ONE warning with the count, not one per record.
    """
    if not records:
        raise ParadaptError("no records to tokenize")
    task = task or infer_task(records)
    check_choice(task, TASKS[1:], "task")
    needed = {
        "lm": ("text",),
        "completion": ("prompt", "completion"),
        "classification": ("text", "label"),
        "chat": ("messages", "train_from"),
    }[task]
    missing = [k for k in needed if k not in records[0]]
    if missing:
        raise DataError(
            *source_of(records[0]), f"task {task!r} needs record fields {missing} (load with that task)"
        )
    max_length = _resolve_max_length(tokenizer, max_length)
    pad = pad_id_of(tokenizer, pad_id)
    dropped = 0
    if task == "classification":
        labels = labels if labels is not None else LabelMap.from_records(records)
        examples, truncated = _tokenize_classification(records, tokenizer, max_length, labels)
    elif task == "chat":
        answers = {r["answer"] for r in records if "answer" in r}
        labels = LabelMap(sorted(answers)) if answers and all("answer" in r for r in records) else None
        examples, truncated = render_chats(records, tokenizer, max_length), 0
    elif task == "lm":
        labels = None
        if packing:
            examples, truncated = _tokenize_packed(records, tokenizer, max_length, add_eos), 0
        else:
            examples, truncated = _tokenize_lm(records, tokenizer, max_length, add_eos)
    else:
        labels = None
        examples, truncated, dropped = _tokenize_completion(records, tokenizer, max_length, add_eos)
    if truncated or dropped:
        msg = f"{truncated} of {len(records)} records were longer than max_length={max_length} tokens and were truncated"
        if dropped:
            msg += f"; {dropped} were dropped because the prompt alone fills max_length"
        warnings.warn(msg, stacklevel=2)
    if not examples:
        path, _ = source_of(records[0])
        raise DataError(path, None, f"no examples left after tokenizing with max_length={max_length}")
    return TokenizedDataset(examples, task, labels, truncated, dropped, pad, max_length)


def _tokenize_classification(
    records: Sequence[dict], tokenizer: Any, max_length: int, labels: LabelMap
) -> tuple[list[dict], int]:
    """Encode once without truncation to count, then re-encode only the long ones truncated."""
    ids = [labels.encode(r) for r in records]  # label errors first: they name file:line
    enc = _encode(tokenizer, [r["text"] for r in records], True)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    long = [i for i, x in enumerate(enc["input_ids"]) if len(x) > max_length]
    fixed = {}
    if long:
        cut = _encode(
            tokenizer, [records[i]["text"] for i in long], True, truncation=True, max_length=max_length
        )
        fixed = {i: {k: cut[k][j] for k in keys} for j, i in enumerate(long)}
    examples = []
    for i, label_id in enumerate(ids):
        ex = fixed.get(i) or {k: enc[k][i] for k in keys}
        ex = dict(ex)
        ex.setdefault("attention_mask", [1] * len(ex["input_ids"]))
        ex["labels"] = label_id
        examples.append(ex)
    return examples, len(long)


def _doc_ids(records: Sequence[dict], tokenizer: Any, add_eos: bool) -> list[list[int]]:
    """Each document's ids (with the tokenizer's special tokens) and EOS when wanted."""
    enc = _encode(tokenizer, [r["text"] for r in records], True)
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for ids in enc["input_ids"]:
        ids = list(ids)
        if add_eos and isinstance(eos, int) and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids)
    return out


def _tokenize_packed(records: Sequence[dict], tokenizer: Any, max_length: int, add_eos: bool) -> list[dict]:
    """Concatenate all documents and cut blocks of exactly ``max_length`` tokens."""
    stream = [t for ids in _doc_ids(records, tokenizer, add_eos) for t in ids]
    n_full = len(stream) // max_length
    blocks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_full)]
    if not blocks and stream:
        blocks = [stream]  # shorter than one block: keep it (collate pads)
    return [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]


def _tokenize_lm(
    records: Sequence[dict], tokenizer: Any, max_length: int, add_eos: bool
) -> tuple[list[dict], int]:
    """One example per document, cut to ``max_length`` (a cut document loses its EOS)."""
    examples, truncated = [], 0
    for ids in _doc_ids(records, tokenizer, add_eos):
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return examples, truncated


def _tokenize_completion(
    records: Sequence[dict], tokenizer: Any, max_length: int, add_eos: bool
) -> tuple[list[dict], int, int]:
    """prompt + completion with the loss masked (-100) on the prompt."""
    prompts = _encode(tokenizer, [r["prompt"] for r in records], True)["input_ids"]
    comps = _encode(tokenizer, [r["completion"] for r in records], False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    examples, truncated, dropped = [], 0, 0
    for p, c in zip(prompts, comps, strict=True):
        c = list(c) + ([eos] if add_eos and isinstance(eos, int) else [])
        ids, labels = list(p) + c, [IGNORE_INDEX] * len(p) + c
        if len(ids) > max_length:
            truncated += 1
            if len(p) >= max_length:
                dropped += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples, truncated, dropped


def collate(batch: Sequence[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch of tensors.

    ``input_ids`` pad with ``pad_id``, ``attention_mask``/``token_type_ids`` with 0, sequence
    ``labels`` with -100 (the loss skips them); integer ``labels`` (classification) become a
    1-D LongTensor. Get ``pad_id`` from :func:`pad_id_of`.
    """
    if padding_side not in ("right", "left"):
        raise ConfigError("padding_side", f"must be 'right' or 'left', got {padding_side!r}")
    if not batch:
        raise ParadaptError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [ex[key] for ex in batch]
        if not isinstance(values[0], (list, tuple)):
            out[key] = torch.tensor(values, dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        rows = []
        for v in values:
            pad = [fill] * (width - len(v))
            rows.append(list(v) + pad if padding_side == "right" else pad + list(v))
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out
