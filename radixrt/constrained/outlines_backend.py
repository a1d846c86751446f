"""outlines-core (regex -> DFA -> a precomputed state x token index; Rust). `pip install outlines-core`.

Everything becomes a regex: JSON schemas through outlines' own schema-to-regex translation
(recursion is unrolled to a fixed depth), so compile time and memory grow with the DFA, and
EBNF (not regular) is refused. The vocabulary is built from the local tokenizer's bytes:
`Vocabulary.from_pretrained` would reach for the model hub.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from .base import CompiledGrammar, GrammarBackend, GrammarMatcher, _bit
from .errors import GrammarError
from .vocab import decode_complete_utf8, token_bytes

try:
    import outlines_core as oc
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the outlines grammar backend needs outlines-core: pip install outlines-core") from exc

_MAX_ROLLBACK = 512  # states remembered per request for rollback
_MAX_JUMP_BYTES = 1024


class OutlinesMatcher(GrammarMatcher):
    def __init__(self, compiled: "_Compiled", guide: "oc.Guide", stop_token_ids: Sequence[int],
                 vocab_size: int) -> None:
        super().__init__(stop_token_ids, vocab_size)
        self._c = compiled
        self._guide = guide

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        assert words.is_contiguous() and words.device.type == "cpu" and words.dtype == torch.int32
        self._guide.write_mask_into(words.data_ptr(), words.numel(), 4)
        if len(self._stop_ids) > 1 and self._guide.is_finished():  # outlines knows one EOS only
            for t in self._stop_ids[1:]:
                words[t // 32] |= _bit(t % 32)

    def _accept(self, token_id: int) -> bool:
        try:
            self._guide.advance(token_id, return_tokens=False)
            return True
        except ValueError:  # no transition: the state is unchanged
            return False

    def _rollback(self, num_tokens: int) -> None:
        self._guide.rollback_state(num_tokens)

    def _is_accepting(self) -> bool:
        return self._guide.is_finished()

    def _copy(self) -> "OutlinesMatcher":
        return OutlinesMatcher(self._c, copy.copy(self._guide), self._stop_ids, self._vocab_size)

    def _jump_forward(self) -> str:
        """Follow the DFA while exactly one byte can come next.

        If a token starting with byte b is allowed, so is the one-byte token b (its state lies
        on the longer token's path), so probing one token per byte is enough. A byte without a
        one-byte token is probed through every token starting with it, and ends the jump.
        """
        index, state, out = self._c.index, self._guide.get_state(), bytearray()
        while len(out) < _MAX_JUMP_BYTES and not index.is_final_state(state):
            nexts = []
            for byte, tokens, single in self._c.probes:
                reached = [s for t in tokens if (s := index.get_next_state(state, t)) is not None]
                if reached:
                    nexts.append((byte, reached[0] if single else None))
                    if len(nexts) > 1:
                        break
            if len(nexts) != 1 or nexts[0][1] is None:
                break
            out.append(nexts[0][0])
            state = nexts[0][1]
        return decode_complete_utf8(bytes(out))


class _Compiled:
    def __init__(self, index: "oc.Index", probes: list[tuple[int, list[int], bool]]) -> None:
        self.index = index
        self.probes = probes  # (byte, [its one-byte token] or [every token starting with it], single)


class OutlinesBackend(GrammarBackend):
    name = "outlines"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 preprocess: bool = True) -> None:
        super().__init__(tokenizer, vocab_size, stop_token_ids, preprocess)
        by_bytes: dict[bytes, list[int]] = {}
        for tid, data in enumerate(token_bytes(tokenizer, vocab_size)):
            if data is not None and tid not in self.stop_token_ids:
                by_bytes.setdefault(data, []).append(tid)
        self._vocab = oc.Vocabulary(self.stop_token_ids[0], by_bytes)
        starting: dict[int, list[int]] = {}
        for data, ids in by_bytes.items():
            starting.setdefault(data[0], []).append(ids[0])
        self._probes = [(b, by_bytes[bytes([b])][:1], True) if bytes([b]) in by_bytes
                        else (b, starting[b], False) for b in sorted(starting)]

    def _compile(self, kind: str, prepared: str) -> Any:
        return _Compiled(oc.Index(prepared, self._vocab), self._probes)  # prepare.py made every kind a regex

    def matcher(self, compiled: CompiledGrammar) -> OutlinesMatcher:
        if compiled.backend != self.name:
            raise GrammarError(f"grammar compiled by {compiled.backend}, not {self.name}")
        guide = oc.Guide(compiled.handle.index, max_rollback=_MAX_ROLLBACK)
        return OutlinesMatcher(compiled.handle, guide, self.stop_token_ids, self.vocab_size)
