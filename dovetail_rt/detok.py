"""Streaming detokenization that never cuts a UTF-8 character in half."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Feed generated ids; get back only the newly completed text.

    Decodes a short window of recent ids and holds text back while it ends in U+FFFD (a
    multi-byte character whose remaining bytes are still to come).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids before this index are fully emitted
        self.emitted = ""  # text of ids[prefix:] already emitted

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted) :]
        if len(self.ids) - self.prefix > 32:  # slide the window forward at a clean point
            self.prefix, self.emitted = len(self.ids), ""
        else:
            self.emitted = text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=self.skip)
        new = text[len(self.emitted) :]
        self.prefix, self.emitted = len(self.ids), ""
        return new
