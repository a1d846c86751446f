"""A step's `ForwardBatch`, sent from rank 0 to the other tensor-parallel ranks as two int64 broadcasts.

Only rank 0 schedules; the others need the same batch to run the same forward on their slice.
Nothing is pickled: a fixed-size header says what follows, then one flat payload carries it::

    header  [kind, T tokens, B requests, R logits rows, P page-table entries, page_size]
             kind: STEP, or SHUTDOWN (nothing follows; the rank exits)
    payload [input_ids T | positions T | out_slots T | qo_indptr B+1 | prefix_lens B | seq_lens B |
             page-table lengths B | page tables, concatenated P | logits_indices R]

Page ids are the same on every rank (rank 0's allocator hands them out; each rank's pool has the
same number of pages), so the batch needs no translation.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from radixrt.attention.base import ForwardBatch

STEP, SHUTDOWN = 1, 0
HEADER_SIZE = 6


def send_batch(batch: ForwardBatch, device: torch.device | str) -> None:
    """Rank 0: broadcast the batch (every other rank is in `receive_batch`)."""
    tables = batch.page_tables
    entries = sum(map(len, tables))
    header = [STEP, batch.num_tokens, batch.batch_size, len(batch.logits_indices), entries, batch.page_size]
    dist.broadcast(torch.tensor(header, dtype=torch.int64, device=device), src=0)
    lists = [*batch.qo_indptr, *batch.prefix_lens, *batch.seq_lens, *map(len, tables), *itertools.chain(*tables)]
    tensors = [batch.input_ids, batch.positions, batch.out_slots, torch.tensor(lists), batch.logits_indices]
    dist.broadcast(torch.cat([t.to(device=device, dtype=torch.int64) for t in tensors]), src=0)


def send_shutdown(device: torch.device | str) -> None:
    """Rank 0: tell every other rank to leave its loop."""
    header = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=device)
    header[0] = SHUTDOWN
    dist.broadcast(header, src=0)


def receive_batch(device: torch.device | str) -> ForwardBatch | None:
    """Ranks > 0: the next step's batch from rank 0, or None when it says shut down."""
    header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    kind, tokens, requests, rows, entries, page_size = header.tolist()
    if kind == SHUTDOWN:
        return None
    payload = torch.empty(3 * tokens + 4 * requests + 1 + entries + rows, dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    input_ids, positions, out_slots, lists, logits_indices = payload.split(
        [tokens, tokens, tokens, 4 * requests + 1 + entries, rows]
    )
    values = lists.tolist()
    qo_indptr, prefix_lens, seq_lens, lengths = (
        values[: requests + 1],
        values[requests + 1 : 2 * requests + 1],
        values[2 * requests + 1 : 3 * requests + 1],
        values[3 * requests + 1 : 4 * requests + 1],
    )
    flat = iter(values[4 * requests + 1 :])
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        out_slots=out_slots,
        qo_indptr=qo_indptr,
        prefix_lens=prefix_lens,
        seq_lens=seq_lens,
        page_tables=[list(itertools.islice(flat, n)) for n in lengths],
        logits_indices=logits_indices,
        page_size=page_size,
    )
