"""The validation of a training run: the loss on fixed validation batches, and the sentence
BLEU of generations for validation sources."""
from __future__ import annotations

from statistics import mean
from typing import ContextManager

import torch

from moediffuseq.data import Seq2SeqDataset, TextTokenizer
from moediffuseq.diffusion import NoiseSchedule, diffusion_loss
from moediffuseq.diffusion.samplers import SamplerConfig
from moediffuseq.evaluate import decoded, sentence_bleu
from moediffuseq.generate import GenerationConfig, generate
from moediffuseq.model import MoEDiffuSeq


@torch.no_grad()
def validation_loss(model: MoEDiffuSeq, schedule: NoiseSchedule, valid_set: Seq2SeqDataset, batch_size: int,
                    batches: int, device: torch.device, autocast: ContextManager) -> float:
    """Mean loss of ``model`` on the first ``batches`` validation batches, with fixed steps and
    noise so that values are comparable across a run (``autocast``: the training's)."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(12345)
    g_cpu = torch.Generator().manual_seed(12345)
    n = len(valid_set)
    losses = []
    for b in range(batches):
        idx = torch.arange(b * batch_size, (b + 1) * batch_size) % n
        batch = valid_set.batch(idx).to(device)
        t = torch.randint(0, schedule.num_steps, (idx.numel(),), generator=g_cpu).to(device)
        with autocast:
            terms = diffusion_loss(model, schedule, batch.input_ids, batch.target_mask, t, generator=g)
        losses.append(float(terms.loss))
    return mean(losses)


def validation_bleu(model: MoEDiffuSeq, tokenizer: TextTokenizer, valid_set: Seq2SeqDataset, examples: int,
                    batch_size: int, bf16: bool, target_len: int) -> float:
    """Sentence BLEU of ``model`` on the first ``examples`` validation sources (the default sampler),
    against the references decoded from their token ids (as the outputs are)."""
    chosen = valid_set.examples[:examples]
    gen_cfg = GenerationConfig(SamplerConfig(), batch_size=batch_size, seed=0,
                               dtype="bf16" if bf16 else None)
    outputs = generate(model, tokenizer, [e.src for e in chosen], gen_cfg, target_len)
    references = decoded([e.trg for e in chosen], tokenizer)
    return mean(sentence_bleu(o.hypothesis.split(), r.split()) for o, r in zip(outputs, references))
