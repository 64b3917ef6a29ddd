"""The memory a training run needs, checked against what the machine has before the run writes
anything: a model, batch or sequence length that cannot fit is refused with one line naming the
estimate and what is available, instead of failing in an allocation (or drawing the OOM killer)
after the run directory was written.

The estimate is meant to stay below the real peak (so a refused run could not have fit), from
the shapes alone: the weights, their EMA copy,
the gradients and AdamW's two moments (5 x 4 bytes a parameter); the activations a batch keeps
for the backward pass (per token and layer: ~16 d_model-wide values, the feed-forward's hidden
units, and with dense attention the L x L scores of every head); the logits over the vocabulary;
the packed dataset (int64 ids). Available: on the CPU the smaller of the kernel's MemAvailable
and the address-space limit (``ulimit -v``) less what the process already maps; on a GPU its
free memory (the dataset stays on the host). On the CPU, for the tiny preset at L = 512 to 2048
with sparse and dense attention, it came to 65-90% of the measured growth of the peak resident
set over two training steps.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Optional

GIB = 1 << 30


@dataclass
class MemoryEstimate:
    state: int        # weights, EMA, gradients, AdamW moments (bytes)
    activations: int  # what one micro-batch keeps for the backward pass
    dataset: int      # the packed training and validation sets (host memory)

    @property
    def device_total(self) -> int:
        return self.state + self.activations


def parameter_count(model_cfg) -> int:
    """The parameters of a model of ``model_cfg``, counted on the meta device (nothing allocated)."""
    import torch

    from moediffuseq.model import MoEDiffuSeq

    with torch.device("meta"):
        return sum(p.numel() for p in MoEDiffuSeq(model_cfg).parameters())


def estimate_training_memory(model_cfg, train_cfg, n_examples: int) -> MemoryEstimate:
    c = model_cfg
    tokens = train_cfg.batch_size * c.max_len
    ffn = 2 * c.top_k * c.d_expert if c.ffn == "moe" else 2 * c.d_ff
    per_token_layer = 16 * c.d_model + ffn
    activations = 4 * tokens * (c.n_layers * per_token_layer + 2 * c.vocab_size + 4 * c.d_emb)
    if c.attention == "dense":
        activations += 4 * train_cfg.batch_size * c.n_heads * c.max_len * c.max_len * c.n_layers
    return MemoryEstimate(state=20 * parameter_count(c), activations=activations, dataset=16 * n_examples * c.max_len)


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def available_host_memory() -> Optional[int]:
    """Bytes this process can still get on the host: MemAvailable, and under an address-space
    limit what is left of it (None when neither is known)."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(max(0, soft - _mapped_bytes()))
    return min(found) if found else None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def check_training_memory(model_cfg, train_cfg, device: str, n_examples: int) -> MemoryEstimate:
    """Raises ``ValueError`` when the run cannot fit in the memory available to it."""
    import torch

    need = estimate_training_memory(model_cfg, train_cfg, n_examples)
    parts = (f"weights, EMA, gradients and optimizer state {_gib(need.state)}, activations of a batch of "
             f"{train_cfg.batch_size} x {model_cfg.max_len} tokens {_gib(need.activations)}")
    fix = "lower --batch-size or --seq-len, or choose a smaller model (--preset, --set)"
    host = available_host_memory()
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if need.device_total > free:
            raise ValueError(f"this run needs at least {_gib(need.device_total)} of GPU memory ({parts}) but "
                             f"{device} has {_gib(free)} free; {fix}")
        host_need, what = need.dataset, f"the packed data set {_gib(need.dataset)}"
    else:
        host_need, what = need.device_total + need.dataset, f"{parts}, the packed data set {_gib(need.dataset)}"
    if host is not None and host_need > host:
        raise ValueError(f"this run needs at least {_gib(host_need)} of memory ({what}) but {_gib(host)} is "
                         f"available; {fix}")
    return need
