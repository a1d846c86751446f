"""A request's state inside the worker: its tokens, its pages and where it is in its life.

    WAITING --admit--> RUNNING --finish/abort--> FINISHED
       ^                  |
       +----preempt-------+   (pages released, recomputed later; the prefix cache keeps what it can)
"""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from radixrt.cache.base import chain_hashes
from radixrt.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixrt.constrained.base import GrammarMatcher


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: ReqStatus = ReqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    # token_ids == prompt_ids + output_ids, kept as one list so slicing is cheap.
    token_ids: list[int] = field(default_factory=list)
    # KV state: pages in order; the first `num_tree_pages` belong to the prefix cache (locked via cache_node).
    page_table: list[int] = field(default_factory=list)
    num_tree_pages: int = 0
    cache_node: object | None = None
    num_computed: int = 0  # tokens whose K/V is in the pages
    cached_tokens: int = 0  # prefix-cache hit at first admission (reported in usage)
    admitted_once: bool = False
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    grammar: GrammarMatcher | None = None  # set once the request's grammar has compiled
    grammar_unenforced: tuple[str, ...] = ()  # a lenient schema's dropped keywords (reported once)
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    # Log probabilities accumulated for the output (sent to the front end incrementally).
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    _page_hashes: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still lacks KV (a prompt, or a prompt being recomputed)."""
        return self.num_computed < self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED

    def page_hashes(self, page_size: int) -> list[int]:
        """Chain hashes of this request's whole pages (kept, and extended as the request grows)."""
        if len(self._page_hashes) < len(self.token_ids) // page_size:
            self._page_hashes = chain_hashes(self.token_ids, page_size, self.params.cache_salt, self._page_hashes)
        return self._page_hashes

    def append_token(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)


def prompt_error(ids: Sequence[int], vocab_size: int, max_context: int) -> str | None:
    """Why a prompt cannot run (empty, unknown token ids, no room left to generate), or None."""
    if not ids:
        return "the prompt is empty"
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        return f"token ids must be integers in [0, {vocab_size})"
    if len(ids) >= max_context:
        return f"the prompt has {len(ids)} tokens; this model's context holds at most {max_context - 1}"
    return None
