"""Incremental detokenization: the text each generated token adds after its prompt (vLLM's way).

Decoding the generated tokens on their own loses text: a SentencePiece (Llama) tokenizer drops
the leading-space marker of the first token it decodes (``"▁upon"`` alone is ``"upon"``), so an
answer to ``"Once"`` read ``"upon a time"`` instead of ``" upon a time"``. Decoding everything
again after every token is also quadratic.

The definition, as vLLM's detokenizer: the completion's text is what the generated tokens add
after the prompt. For each new token, decode a short window ending with it (the last
``CONTEXT`` prompt tokens at first, then from the token before the last released one) and take
what it adds beyond the decode of the same window without it:
``decode(window + [new])[len(decode(window)):]``. A result ending with U+FFFD (the first bytes of
a multi-byte character whose next byte token completes it) is held back until the character is
complete, so no ``"\\ufffd"`` is sent and then taken back. Special tokens are skipped (vLLM's
default ``skip_special_tokens``), so EOS and BOS add no text. When the request ends, whatever is
still held comes out as it decodes (:meth:`IncrementalDetokenizer.flush`).

For tokenizers whose decoding is local (every tokenizer served here), this equals
``decode(prompt + output)[len(decode(prompt)):]`` with special tokens skipped, and the
concatenated pieces of the tokens (``pieces``) equal the text: the streamed deltas and the
log-probability token strings add up to the non-streamed text.
"""

from __future__ import annotations

CONTEXT = 5  # prompt tokens decoded before the first new one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
REPLACEMENT = "\ufffd"
MAX_HELD = 4  # a UTF-8 character is at most 4 bytes: tokens held longer than that release as they are


class IncrementalDetokenizer:
    """The text of one request's generated tokens, grown one token at a time.

    ``text``: the text released so far; ``pieces[i]``: what token ``i`` released (``""`` while
    a character is incomplete; the token that completes it releases the whole character).
    """

    def __init__(self, tokenizer, prompt: list[int], context: int = CONTEXT):
        self.tokenizer = tokenizer
        self.skip = True  # skip_special_tokens (vLLM's default), when the tokenizer takes it
        self.ids: list[int] = list(prompt[-context:]) if context > 0 else []  # the window decoded
        self.read = len(self.ids)  # tokens before this have released their text
        self.before = self._decode(self.ids)  # the window's released part, decoded once per release
        self.text = ""
        self.pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self.skip:
            try:
                return self.tokenizer.decode(ids, skip_special_tokens=True)
            except TypeError:  # a minimal tokenizer whose decode takes the ids alone
                self.skip = False
        return self.tokenizer.decode(ids)

    def _pending(self) -> str:
        """What the tokens after ``read`` add to the window (maybe an incomplete character)."""
        after = self._decode(self.ids)
        return after[len(self.before) :] if len(after) > len(self.before) else ""

    def push(self, token: int) -> str:
        """Add a generated token; returns the text it releases (``""`` while held back)."""
        self.ids.append(int(token))
        delta = self._pending()
        held = len(self.ids) - self.read
        if (delta and not delta.endswith(REPLACEMENT)) or held > MAX_HELD:
            # Past MAX_HELD tokens no character can still complete (byte tokens that never form
            # one, or skipped special tokens): release, so the decoded window stays bounded and a
            # request cannot make each step decode an ever longer window on the engine thread.
            self._release(delta)
        else:
            delta = ""
            self.pieces.append("")
        return delta

    def _release(self, delta: str) -> None:
        self.text += delta
        self.pieces.append(delta)
        self._restart()

    def _restart(self) -> None:
        """Keep only the new window, from the last released token on (all of it released)."""
        self.ids = self.ids[self.read :]
        self.read = len(self.ids)
        self.before = self._decode(self.ids)

    def flush(self) -> str:
        """At the request's end: release what is held (an incomplete character reads U+FFFD),
        counted in the last token's piece. Returns it."""
        if self.read >= len(self.ids) or not self.pieces:
            return ""
        delta = self._pending()
        if delta:
            self.text += delta
            self.pieces[-1] += delta
        self._restart()
        return delta
