"""Sequence packing (METHOD §1): ``[CLS] src [SEP] trg [SEP] [PAD]...`` padded to ``seq_len``,
the longer side truncated first when the pair does not fit.

``target_mask`` is false on the source span (with [CLS] and the first [SEP]) and true on the
target, its [SEP] and the padding: padding is generated too, which is how the output length is
decided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from moediffuseq.data.tokenizer import SpecialIds


def truncate_pair(n_src: int, n_trg: int, budget: int) -> tuple[int, int]:
    """Lengths (src, trg) that fit ``budget`` tokens, cutting the longer side first."""
    if budget < 2:
        raise ValueError(f"need room for at least one source and one target token, got budget {budget}")
    excess = n_src + n_trg - budget
    if excess <= 0:
        return n_src, n_trg
    if n_src > n_trg:  # the longer side down to the shorter one's length first
        cut = min(excess, n_src - n_trg)
        n_src, excess = n_src - cut, excess - cut
    elif n_trg > n_src:
        cut = min(excess, n_trg - n_src)
        n_trg, excess = n_trg - cut, excess - cut
    n_src -= (excess + 1) // 2  # then both alike (the source gives the odd token)
    n_trg -= excess // 2
    return n_src, n_trg


def pack(src: Sequence[int], trg: Sequence[int], seq_len: int, special: SpecialIds) -> tuple[list[int], int]:
    """One packed sequence and the index where the target span starts."""
    n_src, n_trg = truncate_pair(len(src), len(trg), seq_len - 3)
    ids = [special.cls, *src[:n_src], special.sep, *trg[:n_trg], special.sep]
    start = n_src + 2
    return ids + [special.pad] * (seq_len - len(ids)), start


def pack_source(src: Sequence[int], seq_len: int, target_len: int, special: SpecialIds) -> tuple[list[int], int]:
    """For generation: the source packed as if the target had ``target_len`` tokens (so the source
    is truncated as in training); every position after the source's [SEP] is to be generated."""
    n_src, _ = truncate_pair(len(src), max(1, target_len), seq_len - 3)
    ids = [special.cls, *src[:n_src], special.sep]
    return ids + [special.pad] * (seq_len - len(ids)), len(ids)


@dataclass
class PackedBatch:
    input_ids: Tensor    # (B, L) int64
    target_mask: Tensor  # (B, L) bool

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.target_mask.to(device))
