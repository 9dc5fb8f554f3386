"""Streaming detokenization that never cuts a UTF-8 character in half."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Feed generated ids; get back only the newly completed text.

    Each push decodes the ids since the last emitted batch together with that batch (its context: a
    tokenizer may put a space or merge bytes at the boundary) and returns the difference; while the
    text ends in U+FFFD (a multi-byte character whose remaining bytes are still to come) it holds back.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were emitted last: the context of the next decode
        self.read = 0  # ids before this index are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if (text.endswith("\ufffd") and not final) or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]
