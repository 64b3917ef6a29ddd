"""Sequence packing (METHOD §1), in one of two layouts of a sequence of ``seq_len`` positions.

DiffuSeq's layout (``span=None``): ``[CLS] src [SEP] trg [SEP] [PAD]...``, the longer side
truncated first when the pair does not fit. The target span is everything after the source's
[SEP]: the target, its [SEP] and all the padding.

The bounded target span (``span=T``): ``[CLS] src [SEP] [PAD]... | trg [SEP] [PAD]...``, the
source and its own padding on the first ``seq_len - T`` positions, the target, its [SEP] and the
padding that decides its length on the last T. The span is T positions however long the source
is; the source's padding is masked out as keys (``MoEDiffuSeq.positions``). A source longer than
``seq_len - T - 2`` tokens and a target longer than ``T - 1`` are truncated.

``target_mask`` is false on the source side and true on the target span: the padding of the
span is generated too, which is how the output length is decided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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


def check_span(seq_len: int, span: Optional[int]) -> None:
    """A bounded target span must leave room for ``[CLS] src [SEP]`` with one source token."""
    if span is not None and not 2 <= span <= seq_len - 3:
        raise ValueError(f"target_span must be between 2 and seq_len - 3 = {seq_len - 3} (room for [CLS], one "
                         f"source token and [SEP]), got {span}")


def source_budget(seq_len: int, span: int) -> int:
    """The source tokens that fit before a bounded target span of ``span`` positions."""
    return seq_len - span - 2


def pack(src: Sequence[int], trg: Sequence[int], seq_len: int, special: SpecialIds,
         span: Optional[int] = None) -> tuple[list[int], int]:
    """One packed sequence and the index where the target span starts (see the module docstring)."""
    if span is None:
        n_src, n_trg = truncate_pair(len(src), len(trg), seq_len - 3)
        ids = [special.cls, *src[:n_src], special.sep, *trg[:n_trg], special.sep]
        return ids + [special.pad] * (seq_len - len(ids)), n_src + 2
    check_span(seq_len, span)
    source, _ = pack_source(src, seq_len, 0, special, span)
    target = [*trg[:span - 1], special.sep]
    return source[:seq_len - span] + target + [special.pad] * (span - len(target)), seq_len - span


def pack_source(src: Sequence[int], seq_len: int, target_len: int, special: SpecialIds,
                span: Optional[int] = None) -> tuple[list[int], int]:
    """For generation: the source packed as in training, and the index where the span to generate
    starts. DiffuSeq's layout packs the source as if the target had ``target_len`` tokens (so it
    is truncated as in training) and generates every position after its [SEP]; a bounded span
    generates the last ``span`` positions whatever ``target_len`` is."""
    if span is None:
        n_src, _ = truncate_pair(len(src), max(1, target_len), seq_len - 3)
        ids = [special.cls, *src[:n_src], special.sep]
        return ids + [special.pad] * (seq_len - len(ids)), len(ids)
    check_span(seq_len, span)
    ids = [special.cls, *src[:source_budget(seq_len, span)], special.sep]
    return ids + [special.pad] * (seq_len - len(ids)), seq_len - span


@dataclass
class PackedBatch:
    input_ids: Tensor    # (B, L) int64
    target_mask: Tensor  # (B, L) bool

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.target_mask.to(device))
