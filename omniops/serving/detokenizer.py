"""Incremental detokenization and stop strings.

Text is decoded from a sliding window of tokens (as vLLM / TGI do): the new text of a step is what decoding
``tokens[prefix:]`` adds beyond ``tokens[prefix:read]``, held back while it ends in U+FFFD (an incomplete
UTF-8 sequence split over tokens). While streaming, the last ``len(longest stop) - 1`` characters are held back
too, so a stop string split over steps is never partly sent.
"""

from __future__ import annotations

from omniops.serving.request import Request


class IncrementalDetokenizer:
    def __init__(self, tokenizer, req: Request):
        self.tok = tokenizer
        self.req = req
        self.skip_special = req.params.skip_special_tokens
        self.prefix = 0  # token offsets into req.output_token_ids
        self.read = 0
        self.text = ""  # all decoded text (after any stop-string cut)
        self.sent = 0  # characters of self.text already returned as deltas
        self.stops = req.params.stop
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special)

    def update(self) -> str | None:
        """Decode what the last step added. Returns the stop string if one was hit (the text is cut there)."""
        ids = self._ids()
        prev = self._decode(ids[self.prefix:self.read])
        new = self._decode(ids[self.prefix:])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            start_search = max(0, len(self.text) - self.holdback)
            self.text += new[len(prev):]
            self.prefix, self.read = self.read, len(ids)
            for s in self.stops:
                at = self.text.find(s, start_search)
                if at >= 0:
                    end = at + len(s) if self.req.params.include_stop_str_in_output else at
                    self.text = self.text[:end]
                    return s
        return None

    def _ids(self) -> list[int]:
        """The output tokens that make text: an ending EOS or stop token adds none (vLLM's behaviour)."""
        ids, r = self.req.output_token_ids, self.req
        if ids and r.finish_reason == "stop" and (r.stop_reason is None or isinstance(r.stop_reason, int)):
            return ids[:-1]
        return ids

    def flush(self) -> str:
        """Decode the held-back tail (a dangling partial character) once the request has ended."""
        ids = self._ids()
        if self.read < len(ids):
            prev = self._decode(ids[self.prefix:self.read])
            self.text += self._decode(ids[self.prefix:])[len(prev):]
            self.prefix = self.read = len(ids)
        return self.text

    def delta(self, finished: bool) -> str:
        """Text not yet returned; while running, minus the stop-string holdback."""
        end = len(self.text) if finished or not self.stops else max(self.sent, len(self.text) - self.holdback)
        out = self.text[self.sent:end]
        self.sent = end
        return out
