"""Tokenised, packed splits and the resumable stream of training batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from moediffuseq.data.jsonl import Example
from moediffuseq.data.packing import PackedBatch, check_span, pack, source_budget
from moediffuseq.data.tokenizer import TextTokenizer


class Seq2SeqDataset:
    """Every example tokenised and packed once: ``input_ids`` (N, L), ``target_start`` (N,), in
    DiffuSeq's layout or with a bounded target span of ``span`` positions (moediffuseq.data.packing).
    ``src_lengths`` / ``trg_lengths`` are token counts capped at L - 2 (one more than fits);
    ``truncated`` counts the examples cut to fit, ``truncated_sources`` those whose source was."""

    def __init__(self, examples: Sequence[Example], tokenizer: TextTokenizer, seq_len: int,
                 span: Optional[int] = None) -> None:
        if not examples:
            raise ValueError("Seq2SeqDataset: no examples")
        if seq_len < 5:
            raise ValueError(f"seq_len must be >= 5, got {seq_len}")
        self.examples = list(examples)
        self.seq_len, self.span = seq_len, span
        check_span(seq_len, span)
        # a side longer than the budget is cut the same at any length beyond it (truncate_pair),
        # so only budget + 1 tokens of each text are needed: a huge line costs no more than that
        cap = seq_len - 3 + 1
        src = tokenizer.encode_batch([e.src for e in self.examples], max_tokens=cap)
        trg = tokenizer.encode_batch([e.trg for e in self.examples], max_tokens=cap)
        rows = [pack(s, t, seq_len, tokenizer.special, span) for s, t in zip(src, trg)]
        self.input_ids = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (N, L)
        self.target_start = torch.tensor([r[1] for r in rows], dtype=torch.long)  # (N,)
        self.src_lengths = torch.tensor([len(s) for s in src])
        self.trg_lengths = torch.tensor([len(t) for t in trg])
        if span is None:
            self.truncated = int(((self.src_lengths + self.trg_lengths + 3) > seq_len).sum())
            self.truncated_sources = int((self.src_lengths > self.target_start - 2).sum())
        else:
            long_src = self.src_lengths > source_budget(seq_len, span)
            self.truncated = int((long_src | (self.trg_lengths > span - 1)).sum())
            self.truncated_sources = int(long_src.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: Tensor | Sequence[int]) -> PackedBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        ids = self.input_ids[idx]  # (B, L)
        target_mask = torch.arange(self.seq_len)[None] >= self.target_start[idx][:, None]  # (B, L)
        return PackedBatch(ids, target_mask)

    def target_length_quantile(self, q: float = 0.5) -> int:
        """A quantile of the target lengths in tokens (the default target budget at generation)."""
        return int(torch.quantile(self.trg_lengths.double(), q).round())


@dataclass
class BatchStream:
    """Shuffled batches of a dataset, epoch after epoch, with an exact resume point.

    Each epoch is a permutation drawn from ``seed + epoch``; a global batch of
    ``batch_size * world_size`` indices is cut from it and rank r takes its r-th share. The
    last incomplete global batch of an epoch is dropped.
    """

    size: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.batch_size * self.world_size > self.size:
            raise ValueError(f"global batch {self.batch_size} x {self.world_size} ranks is larger than the "
                             f"training set ({self.size} examples)")
        self._perm = None

    def _permutation(self) -> Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.size, generator=g))
        return self._perm[1]

    def next(self) -> Tensor:
        global_batch = self.batch_size * self.world_size
        if self.position + global_batch > self.size:
            self.epoch, self.position = self.epoch + 1, 0
        chunk = self._permutation()[self.position:self.position + global_batch]
        self.position += global_batch
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._perm = None
