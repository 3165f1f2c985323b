"""Bounds on what one request may make the server do, checked before the expensive work.

Tokenizing runs off the event loop (:func:`tokenize_text`): a 10 MB prompt tokenized on it
blocked ``/health`` and every stream for seconds. Before that, cheap checks refuse what can
never be served: text that is not valid Unicode (a lone surrogate from JSON's ``\\ud800``
escape; the tokenizer would raise a 500), and text longer than any tokenization of the
model's position limit could cover (:func:`max_prompt_chars`).
"""

from __future__ import annotations

import asyncio

from ..errors import ConfigError

MAX_STOP = 4  # OpenAI's limit on `stop` strings
MAX_STOP_CHARS = 256  # each; matched against the text after every token
_LONGEST_TOKEN: dict[int, int] = {}


def bounded_stop(stop: str | list[str] | None) -> str | list[str] | None:
    """``stop`` if it has at most :data:`MAX_STOP` strings of at most :data:`MAX_STOP_CHARS`
    characters (a pydantic validator: raises ValueError). Every string is matched against the
    text after every token; 1 MB of them blocked a stream for 40 s."""
    many = [stop] if isinstance(stop, str) else stop or []
    if len(many) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(many)}")
    for s in many:
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings are at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return stop


def check_unicode(text: str, field: str) -> None:
    """Refuse text with a lone surrogate (valid JSON, not valid Unicode), naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(
            field, f"contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}"
        ) from None


def longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (computed once per tokenizer)."""
    key = id(tokenizer)
    if key not in _LONGEST_TOKEN:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _LONGEST_TOKEN[key] = max(map(len, vocab), default=0) or 64
    return _LONGEST_TOKEN[key]


def max_prompt_chars(tokenizer, max_len: int | None) -> int | None:
    """Characters beyond which a text cannot fit ``max_len`` tokens, with a 4x margin: every
    token covers at most its vocabulary entry's characters (byte-level entries spell a
    character in more), so longer text needs more tokens than the model has positions."""
    if max_len is None or tokenizer is None:
        return None
    return 4 * max_len * longest_token(tokenizer)


def checked_tokens(
    tokenizer, text: str, max_len: int | None, field: str = "prompt", add_special_tokens: bool = True
) -> list[int]:
    """``text``'s token ids after the cheap checks (blocking: call it off the event loop)."""
    if tokenizer is None:
        raise ConfigError(field, "text needs the server's tokenizer; send token ids")
    check_unicode(text, field)
    bound = max_prompt_chars(tokenizer, max_len)
    if bound is not None and len(text) > bound:
        raise ConfigError(
            field, f"{len(text)} characters cannot fit the model's {max_len} positions in any tokenization"
        )
    # the keyword only when it differs from the default: a minimal tokenizer takes the text alone
    out = tokenizer(text) if add_special_tokens else tokenizer(text, add_special_tokens=False)
    return list(out["input_ids"])


async def tokenize_text(tokenizer, text: str, max_len: int | None, field: str = "prompt") -> list[int]:
    """``text``'s token ids, checked and tokenized on a worker thread."""
    if tokenizer is None:
        raise ConfigError(field, "text needs the server's tokenizer; send token ids")
    check_unicode(text, field)  # before any thread: a lone surrogate is refused at once
    return await asyncio.to_thread(checked_tokens, tokenizer, text, max_len, field)
