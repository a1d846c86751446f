"""How `select` turns per-token log-probs of each choice into a decision.

A backend scores every choice as a continuation of the same prefix and hands the method,
for each choice, the log-probs of the choice's own tokens as `[logprob, token_id, text]`
entries (SGLang's `input_token_logprobs` shape). Names match SGLang's `sglang.lang.choices`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

TokenLogprobs = list[list[Any]]  # [[logprob, token_id, text or None], ...] for one choice


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] | None = None


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[TokenLogprobs],
        output_token_logprobs: list[TokenLogprobs],
        unconditional_token_logprobs: list[TokenLogprobs] | None = None,
    ) -> ChoicesDecision: ...

    def __repr__(self) -> str:
        return type(self).__name__


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The highest mean log-prob per token: long choices are not penalised for their length."""

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs, **_):
        best = _argmax(normalized_prompt_logprobs)
        meta = {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
        }
        return ChoicesDecision(choices[best], meta)


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Decide token by token: keep the choices whose next token is most likely, until one is left.

    A choice shorter than the others is padded with its own mean log-prob, so a choice that
    is a prefix of another still competes on the later positions.
    """

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs, **_):
        width = max(len(t) for t in input_token_logprobs)
        matrix = []
        for tokens in input_token_logprobs:
            values = [t[0] for t in tokens]
            mean = sum(values) / len(values) if values else float("nan")
            matrix.append(values + [mean] * (width - len(values)))
        remaining = list(range(len(choices)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        meta = {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "greedy_logprob_matrix": matrix,
        }
        return ChoicesDecision(choices[remaining[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The highest mean of log p(token | prompt) - log p(token | nothing): corrects for choices
    that are likely anywhere. The first unconditional token has no context; it counts as 0."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ):
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional token logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            if len(cond) != len(uncond):
                raise ValueError("conditional and unconditional token logprobs must have the same length")
            u = [t[0] for t in uncond]
            u[0] = u[0] or 0.0
            scores.append(sum(c[0] - x for c, x in zip(cond, u)) / len(cond))
        meta = {
            "normalized_prompt_logprobs": normalized_prompt_logprobs,
            "input_token_logprobs": input_token_logprobs,
            "output_token_logprobs": output_token_logprobs,
            "unconditional_token_logprobs": unconditional_token_logprobs,
            "normalized_unconditional_prompt_logprobs": scores,
        }
        return ChoicesDecision(choices[_argmax(scores)], meta)


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (NaN never wins)."""
    return max(range(len(values)), key=lambda i: -math.inf if math.isnan(values[i]) else values[i])


def mean_logprob(tokens: TokenLogprobs) -> float:
    values = [t[0] for t in tokens if t[0] is not None]
    return sum(values) / len(values) if values else -math.inf


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
