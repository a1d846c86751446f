"""One step's batch: the flat forward layout plus which logits rows each request needs.

The scheduler decides which requests run and how many new tokens each computes; this turns
that into the tensors of a `ForwardBatch` (radixrt/attention/base.py draws the layout) and
remembers, for every logits row the forward returns, what it is for::

    new tokens:   [ r0: 5 (prefill, wants prompt logprobs) | r1: 1 (decode) | r2: 3 (last chunk) ]
    logits rows:    0 1 2 3 4                                 5                6
    sample_rows:    (r1, 5), (r2, 6)          r0 did not reach its last prompt token yet
    prompt_rows:    (r0, first_row=0, count=5, first_position=start of r0's chunk)

A speculative verify step (worker/speculative.py) gives a decode request its last token plus k
draft tokens, prefill-shaped, and samples at all 1 + k of them: `SampleRow(req, row, count=1 + k)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixrt.attention.base import ForwardBatch
from radixrt.request import Req


@dataclass
class SampleRow:
    """A request whose next token is sampled from logits row `row` (and, verifying `count - 1` drafts,
    the rows after it: row + i follows the i-th draft)."""

    req: Req
    row: int
    count: int = 1


@dataclass
class PromptRows:
    """`count` consecutive logits rows from `first_row`: req's positions from `first_position` on."""

    req: Req
    first_row: int
    count: int
    first_position: int


@dataclass
class StepBatch:
    forward: ForwardBatch
    sample_rows: list[SampleRow]
    prompt_rows: list[PromptRows]

    @classmethod
    def build(
        cls,
        reqs: Sequence[Req],
        num_new: Sequence[int],
        page_size: int,
        device,
        drafts: Sequence[Sequence[int]] | None = None,
    ) -> "StepBatch":
        """Flatten the step's new tokens; ask for logits only where a token is sampled or scored.
        With `drafts`, request i's num_new[i] new tokens end with drafts[i] (not in its token_ids)."""
        seqs: list[tuple[list[int], int, list[int]]] = []
        logits_rows: list[int] = []
        sample_rows: list[SampleRow] = []
        prompt_rows: list[PromptRows] = []
        first_row = 0
        for i, (req, n) in enumerate(zip(reqs, num_new)):
            draft = list(drafts[i]) if drafts else []
            start, own = req.num_computed, n - len(draft)
            seqs.append((req.page_table, start, req.token_ids[start : start + own] + draft))
            if req.params.prompt_logprobs and not req.output_ids:
                prompt_rows.append(PromptRows(req, len(logits_rows), n, start))
                logits_rows.extend(range(first_row, first_row + n))
                if start + n == req.num_tokens:
                    sample_rows.append(SampleRow(req, len(logits_rows) - 1))
            elif start + own == req.num_tokens:
                sample_rows.append(SampleRow(req, len(logits_rows), len(draft) + 1))
                logits_rows.extend(range(first_row + own - 1, first_row + n))
            first_row += n
        return cls(flat_batch(seqs, logits_rows, page_size, device), sample_rows, prompt_rows)


def flat_batch(
    seqs: Sequence[tuple[list[int], int, Sequence[int]]], logits_rows: Sequence[int], page_size: int, device
) -> ForwardBatch:
    """The ForwardBatch of sequences given as (page table, position of the first new token, new token ids),
    with logits at `logits_rows` of the flat token axis. The draft model builds its steps with it too."""
    ids, positions, slots, qo_indptr = [], [], [], [0]
    for table, start, tokens in seqs:
        end = start + len(tokens)
        ids.extend(tokens)
        positions.extend(range(start, end))
        slots.extend(table[p // page_size] * page_size + p % page_size for p in range(start, end))
        qo_indptr.append(qo_indptr[-1] + len(tokens))

    def i64(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return ForwardBatch(
        input_ids=i64(ids),
        positions=i64(positions),
        out_slots=i64(slots),
        qo_indptr=qo_indptr,
        prefix_lens=[start for _, start, _ in seqs],
        seq_lens=[start + len(tokens) for _, start, tokens in seqs],
        page_tables=[table for table, _, _ in seqs],
        logits_indices=i64(logits_rows),
        page_size=page_size,
    )
