"""Token bitmasks: one bit per vocabulary entry, 32 per int32 word (the xgrammar/llguidance layout).

    bitmask[b, w] (int32)      bit i of word w  <->  token 32*w + i of batch row b
    word:  | bit31 ... bit1 bit0 |
    token: | 32w+31 ... 32w+1 32w |

Bit 31 is the int32 sign bit, so a fully allowed word is -1. Plain torch only: the engines'
own apply kernels go through torch.compile, which costs seconds on the first call.
"""

from __future__ import annotations

from typing import Sequence

import torch

_BITS: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """[1, 2, 4, ..., -2**31] as int32: AND with a word tests each of its 32 bits."""
    if device not in _BITS:
        _BITS[device] = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32).to(device)
    return _BITS[device]


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A [B, ceil(V/32)] int32 bitmask with every token allowed (the state of rows without a grammar)."""
    return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def bitmask_to_allowed(bitmask: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Unpack to bool [B, V] (V = 32 * words unless `vocab_size` trims it)."""
    allowed = (bitmask.unsqueeze(-1) & _bit_values(bitmask.device)).ne(0).flatten(1)
    return allowed if vocab_size is None else allowed[:, :vocab_size]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | torch.Tensor | None = None) -> None:
    """Set disallowed logits to -inf, in place, for the constrained `rows` only (None = every row).

    Row i of `bitmask` belongs to row i of `logits`; other rows are not read or written, so a
    request without a grammar is never touched by another's mask. One unpack and one
    masked_fill cover all constrained rows together.
    """
    mask = bitmask.to(logits.device, non_blocking=True)
    if rows is None:
        _mask_block(logits, bitmask_to_allowed(mask))
        return
    index = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
    if index.numel() == 0:
        return
    block = logits.index_select(0, index)
    _mask_block(block, bitmask_to_allowed(mask.index_select(0, index)))
    logits.index_copy_(0, index, block)


def _mask_block(block: torch.Tensor, allowed: torch.Tensor) -> None:
    """block [n, V] logits, allowed [n, 32 * words]; ids past the mask are never allowed."""
    width = min(block.shape[1], allowed.shape[1])
    block[:, width:] = float("-inf")
    block[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
