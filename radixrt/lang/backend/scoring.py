"""`select` on backends that can return prompt log-probs for token ids (Engine, RuntimeEndpoint).

Every choice is scored as a continuation of the state's text, all in one batched request:

    prefix ids   [ p0 p1 ... p(k-1) | pk ... ]        the text so far, tokenized alone
    choice ids   [ p0 p1 ... p(k-1) | c0 c1 ... ]     text + choice, tokenized together
                                    ^ start: first token that differs from the prefix's

Tokenizing text + choice together keeps what the model would really see when BPE merges
across the boundary ("token healing"); the choice's score covers its ids from `start` on.
All choices go to the engine as one batch, each asking for prompt log-probs from its `start`
only, so the prefix before it is read from the radix cache: cached by the program's earlier
calls, or (the part that is not) computed once by the first choice while the others wait for
it (the scheduler's in-batch prefix sharing). A separate caching request first would cost a
scheduling step per select for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from radixrt.lang.choices import ChoicesDecision, ChoicesSamplingMethod, TokenLogprobs, mean_logprob


@dataclass
class ChoiceTokens:
    ids: list[int]  # prefix + choice, tokenized together
    start: int  # index of the first token that belongs to the choice

    @property
    def choice_ids(self) -> list[int]:
        return self.ids[self.start :]


def check_select(choices: Sequence[str], temperature: float) -> None:
    if not choices:
        raise ValueError("select() needs at least one choice")
    if any(not isinstance(c, str) or not c for c in choices):
        raise ValueError(f"select() choices must be non-empty strings (got {list(choices)!r})")
    if temperature > 1e-5:
        raise ValueError(f"select() scores choices greedily; temperature must be 0 (got {temperature})")


def split_choices(encode: Callable[[str], list[int]], prefix: str, choices: Sequence[str]) -> list[ChoiceTokens]:
    prefix_ids = encode(prefix)
    out = []
    for choice in choices:
        ids = encode(prefix + choice)
        start = 0
        while start < min(len(ids), len(prefix_ids)) and ids[start] == prefix_ids[start]:
            start += 1
        out.append(ChoiceTokens(ids, min(start, len(ids) - 1)))
    return out


def token_logprobs(logprobs: Sequence[float | None], ids: Sequence[int], decode=None) -> TokenLogprobs:
    """SGLang's `[logprob, token_id, text]` entries; a missing log-prob (no context) counts as 0."""
    return [[lp if lp is not None else 0.0, t, decode(t) if decode else None] for lp, t in zip(logprobs, ids)]


def decide(
    choices: Sequence[str],
    method: ChoicesSamplingMethod,
    conditional: list[TokenLogprobs],
    unconditional: list[TokenLogprobs] | None = None,
) -> ChoicesDecision:
    return method(
        choices=list(choices),
        normalized_prompt_logprobs=[mean_logprob(t) for t in conditional],
        input_token_logprobs=conditional,
        output_token_logprobs=[[] for _ in choices],
        unconditional_token_logprobs=unconditional,
    )
