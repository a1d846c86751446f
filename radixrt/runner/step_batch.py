"""One step's batch: the flat forward layout plus which logits rows each request needs.

The scheduler decides which requests run and how many new tokens each computes; this turns
that into the tensors of a `ForwardBatch` (radixrt/attention/base.py draws the layout) and
remembers, for every logits row the forward returns, what it is for::

    new tokens:   [ r0: 5 (prefill, wants prompt logprobs) | r1: 1 (decode) | r2: 3 (last chunk) ]
    logits rows:    0 1 2 3 4                                 5                6
    sample_rows:    (r1, 5), (r2, 6)          r0 did not reach its last prompt token yet
    prompt_rows:    (r0, first_row=0, count=5, first_position=start of r0's chunk)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixrt.attention.base import ForwardBatch
from radixrt.request import Req


@dataclass
class SampleRow:
    """A request whose next token is sampled from logits row `row`."""

    req: Req
    row: int


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
    def build(cls, reqs: Sequence[Req], num_new: Sequence[int], page_size: int, device) -> "StepBatch":
        """Flatten the step's new tokens; ask for logits only where a token is sampled or scored."""
        ids, positions, slots, qo_indptr = [], [], [], [0]
        logits_rows: list[int] = []
        sample_rows: list[SampleRow] = []
        prompt_rows: list[PromptRows] = []
        for req, n in zip(reqs, num_new):
            start = req.num_computed
            table = req.page_table
            ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // page_size] * page_size + p % page_size for p in range(start, start + n))
            first_row = qo_indptr[-1]
            qo_indptr.append(first_row + n)
            reaches_end = start + n == req.num_tokens
            if req.params.prompt_logprobs and not req.output_ids:
                prompt_rows.append(PromptRows(req, len(logits_rows), n, start))
                logits_rows.extend(range(first_row, first_row + n))
                if reaches_end:
                    sample_rows.append(SampleRow(req, len(logits_rows) - 1))
            elif reaches_end:
                sample_rows.append(SampleRow(req, len(logits_rows)))
                logits_rows.append(first_row + n - 1)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        forward = ForwardBatch(
            input_ids=i64(ids),
            positions=i64(positions),
            out_slots=i64(slots),
            qo_indptr=qo_indptr,
            prefix_lens=[r.num_computed for r in reqs],
            seq_lens=[r.num_computed + n for r, n in zip(reqs, num_new)],
            page_tables=[r.page_table for r in reqs],
            logits_indices=i64(logits_rows),
            page_size=page_size,
        )
        return cls(forward, sample_rows, prompt_rows)
