"""Chat data: rows become conversations, conversations become token ids with the loss on the assistant.

A chat record is ``{"messages": [{"role", "content"}, ...], "train_from": k}`` (plus ``"answer"``,
the label word, when it came from a labelled row): the loss covers the tokens of every
assistant message at index ``k`` or later and nothing else. Three row shapes become one:

* ``{"messages": [...]}`` (OpenAI chat format, multi-turn): every assistant message is trained;
* ``{"prompt", "completion"}`` with ``task: chat``: a user turn and the assistant's answer (either
  may also be a list of messages, as in TRL's conversational prompt/completion); only the
  completion is trained;
* a labelled row and ``prompt_template``: the user turn is the template filled from the row,
  the assistant's answer is the label's word from ``labels``.

The tokens are the tokenizer's own chat template (``apply_chat_template``), as the model sees
them when it is served. Which tokens are the assistant's is found without any knowledge of the
template: render the conversation up to each trained assistant turn with the generation prompt
(``add_generation_prompt=True``) and through that turn, tokenize, and take the difference. This
needs the template to be *prefix-consistent* (each shorter rendering is a prefix of the longer
ones, in text and in tokens); a template that is not fails naming the row's ``file:line``. The
answer ends at the tokenizer's EOS (the end-of-turn token of chat models such as SmolLM2's
``<|im_end|>``): whatever the template writes after it (a newline) is never generated, so it is
not trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .labels import canon_label
from .records import IGNORE_INDEX, DataError, short_repr, source_of
from .spec import PLACEHOLDER, DataSpec

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- rows -> conversations


def chat_record(spec: DataSpec, row: dict, path: Path, line: int) -> dict:
    """A row of the file as a chat record (see the module doc); a bad row fails naming ``path:line``."""
    if spec.prompt_template is not None:
        messages, train_from, answer = _from_template(spec, row, path, line)
    elif spec.messages_field in row:
        messages, train_from, answer = (
            _messages(row[spec.messages_field], spec.messages_field, path, line),
            0,
            None,
        )
    elif spec.prompt_field in row or spec.completion_field in row:
        messages, train_from, answer = *_from_prompt_completion(spec, row, path, line), None
    else:
        raise DataError(
            path,
            line,
            f"a chat row needs {spec.messages_field!r}, or {spec.prompt_field!r} and "
            f"{spec.completion_field!r}, or a prompt_template (fields found: {sorted(row)})",
        )
    if spec.system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": spec.system})
        train_from += 1
    if not any(m["role"] == "assistant" for m in messages[train_from:]):
        raise DataError(
            path, line, "no assistant message to learn from (the loss covers the assistant's turns)"
        )
    record = {"messages": messages, "train_from": train_from, "_file": str(path), "_line": line}
    if answer is not None:
        record["answer"] = answer
    return record


def _content(value: Any, where: str, path: Path, line: int) -> str:
    """A message's text: a string, or OpenAI content parts ``[{"type": "text", "text": ...}]`` joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise DataError(path, line, f"{where} must be a string (or text parts), got {short_repr(value)}")


def _messages(value: Any, field: str, path: Path, line: int) -> list[dict]:
    """A list of ``{role, content}``, checked; other keys of a message are left out."""
    if not isinstance(value, list) or not value:
        raise DataError(
            path, line, f"{field!r} must be a non-empty list of {{role, content}}, got {short_repr(value)}"
        )
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(
                path, line, f"{where} must be an object with role and content, got {short_repr(m)}"
            )
        if m.get("role") not in ROLES:
            raise DataError(
                path, line, f"{where}.role must be one of {list(ROLES)}, got {short_repr(m.get('role'))}"
            )
        if "content" not in m:
            raise DataError(path, line, f"{where} has no content")
        out.append({"role": m["role"], "content": _content(m["content"], f"{where}.content", path, line)})
    return out


def _from_prompt_completion(spec: DataSpec, row: dict, path: Path, line: int) -> tuple[list[dict], int]:
    """A user turn (or prompt messages) and the assistant's completion (or completion messages)."""
    parts = []
    for field, role in ((spec.prompt_field, "user"), (spec.completion_field, "assistant")):
        if field not in row:
            raise DataError(path, line, f"missing field {field!r} (fields found: {sorted(row)})")
        value = row[field]
        if isinstance(value, list):
            parts.append(_messages(value, field, path, line))
        else:
            parts.append([{"role": role, "content": _content(value, field, path, line)}])
    prompt, completion = parts
    return prompt + completion, len(prompt)


def _from_template(spec: DataSpec, row: dict, path: Path, line: int) -> tuple[list[dict], int, str]:
    """The user turn ``prompt_template`` filled from the row; the answer the label's word."""
    values = {}
    for name, field in spec.template_fields().items():
        if field not in row:
            raise DataError(
                path,
                line,
                f"prompt_template needs field {field!r}, which this row lacks (fields found: {sorted(row)})",
            )
        value = row[field]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(path, line, f"field {field!r} must be a string, got {short_repr(value)}")
        values[name] = str(value)
    if spec.label_field not in row:
        raise DataError(
            path,
            line,
            f"missing field {spec.label_field!r}: the answer is the row's label (fields found: {sorted(row)}); "
            f"set {spec.where}.label_field",
        )
    answer = answer_of(spec, row[spec.label_field], path, line)
    user = PLACEHOLDER.sub(lambda m: values[m.group(1)], spec.prompt_template or "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], 0, answer


def answer_of(spec: DataSpec, label: Any, path: Path, line: int | None) -> str:
    """The answer word of a raw label: ``labels[label]`` (a mapping), else the label itself."""
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):
        raise DataError(path, line, f"a label must be a string or an integer, got {short_repr(label)}")
    key = canon_label(label)
    if isinstance(spec.labels, dict):
        if key not in spec.labels:
            raise DataError(
                path, line, f"label {label!r} has no answer word in {spec.where}.labels {spec.labels!r}"
            )
        return spec.labels[key]
    if spec.labels is not None and key not in [canon_label(x) for x in spec.labels]:
        raise DataError(path, line, f"label {label!r} is not one of {spec.where}.labels {spec.labels!r}")
    return str(key)


# --------------------------------------------------------------------------- conversations -> tokens


def check_chat_template(tokenizer: Any) -> None:
    """Chat data needs the tokenizer's chat template; without one, say what to do instead."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "model",
            "the model's tokenizer has no chat template, so chat data (messages, prompt_template, "
            "task: chat) cannot be rendered as the model expects; use a chat (instruct) model, or "
            "prompt/completion records with task 'completion' (plain prompt + completion)",
        )


def render_chats(records: Sequence[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """Each chat record as ``input_ids``/``attention_mask``/``labels`` (-100 outside the answers).

    A conversation longer than ``max_length`` tokens fails naming its ``file:line``: cutting it
    would cut an answer, or leave an answer without the question.
    """
    check_chat_template(tokenizer)
    texts: list[str] = []
    plans: list[list[tuple[int, int]]] = []  # per record: (prefix text index, through text index) per turn
    full_at: list[int] = []
    for r in records:
        msgs, turns = r["messages"], []
        for k in range(r["train_from"], len(msgs)):
            if msgs[k]["role"] == "assistant":
                texts += [
                    _render(tokenizer, msgs[:k], True, r, k),
                    _render(tokenizer, msgs[: k + 1], False, r, k),
                ]
                turns.append((len(texts) - 2, len(texts) - 1))
        texts.append(_render(tokenizer, msgs, False, r, None))
        full_at.append(len(texts) - 1)
        plans.append(turns)
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    eos = getattr(tokenizer, "eos_token_id", None)
    examples = []
    for r, turns, f in zip(records, plans, full_at, strict=True):
        full = list(ids[f])
        labels = [IGNORE_INDEX] * len(full)
        end = 0
        for n, (p, t) in enumerate(turns, start=1):
            start, stop = _span(texts, ids, p, t, f, end, r, n)
            stop = _cut_after_eos(full, start, stop, eos)
            labels[start:stop] = full[start:stop]
            end = stop
        if len(full) > max_length:
            raise DataError(
                *source_of(r),
                f"the conversation is {len(full)} tokens with the chat template, over max_length={max_length} "
                "(tokenize.max_length); raise it, or shorten or leave out this row",
            )
        examples.append({"input_ids": full, "attention_mask": [1] * len(full), "labels": labels})
    return examples


def _render(
    tokenizer: Any, messages: list[dict], generation_prompt: bool, record: dict, turn: int | None
) -> str:
    """The chat template's text; a template error fails naming the row."""
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja2 errors, raise_exception() in a template
        what = "the conversation" if turn is None else f"the conversation up to message {turn}"
        raise DataError(*source_of(record), f"the chat template failed on {what}: {e}") from None
    if not isinstance(text, str):
        raise DataError(*source_of(record), f"the chat template returned {type(text).__name__}, not text")
    return text


def _span(
    texts: list[str], ids: list, p: int, t: int, f: int, end: int, record: dict, n: int
) -> tuple[int, int]:
    """Token span of an assistant turn: after its prompt, up to the end of the turn.

    Checked: the prompt's rendering is a prefix of the turn's, which is a prefix of the whole
    conversation, in text and in tokens (a tokenizer may merge across the boundary), and the
    turn starts after the previous one ended.
    """
    full_text, full_ids = texts[f], ids[f]
    prefix, through = ids[p], ids[t]
    if not (full_text.startswith(texts[t]) and texts[t].startswith(texts[p])):
        raise DataError(
            *source_of(record),
            f"the chat template is not prefix-consistent at assistant turn {n}: the conversation rendered "
            "up to that turn (with the generation prompt) is not the start of the whole conversation, so "
            "the assistant's tokens cannot be told apart; use a template that renders earlier turns "
            "unchanged (or train on single-turn rows)",
        )
    if list(full_ids[: len(through)]) != list(through) or list(through[: len(prefix)]) != list(prefix):
        raise DataError(
            *source_of(record),
            f"the tokenizer merges tokens across the start or end of assistant turn {n} (the rendered "
            "text is prefix-consistent but its tokens are not), so the assistant's tokens cannot be told apart",
        )
    start, stop = len(prefix), len(through)
    if start < end or stop <= start:
        raise DataError(*source_of(record), f"assistant turn {n} renders to no tokens of its own")
    return start, stop


def _cut_after_eos(ids: list[int], start: int, stop: int, eos: int | None) -> int:
    """The answer ends at its last EOS (end of turn): the template's text after it is never generated."""
    if not isinstance(eos, int):
        return stop
    for i in range(stop - 1, start - 1, -1):
        if ids[i] == eos:
            return i + 1
    return stop
