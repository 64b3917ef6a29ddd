"""What reading (B, L, H, D) views in place saves in the model: a training step (forward,
backward, AdamW) of MoEDiffuSeq with its attention modules as they are (q, k, v are strided
views of the fused QKV projection, layout "blhd") against the same modules making the copies an
op without strides needs (q, k, v transposed into contiguous (B, H, L, D) tensors, the output
transposed back), same weights and batch, the two alternated in one run. The copies alone are
also timed, and counted in bytes (read + written, forward and backward).

    python -m bench.attention_layout                        # L = 2048 on the CPU (bench/end_to_end's shape)
    python -m bench.attention_layout --device cuda --bf16   # the base preset on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from bench.common import copy_bandwidth, machine_description
from bench.end_to_end import training_step
from moediffuseq.nn import BlockSparseSelfAttention
from moediffuseq.ops import block_sparse_attention


class CopyingAttention(BlockSparseSelfAttention):
    """The module with the transposed copies of an op that takes contiguous (B, H, L, D) only."""

    def forward(self, x, global_mask=None, key_padding_mask=None):
        B, L, _ = x.shape
        hd, H, Hkv = self.d_model // self.n_heads, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).view(B, L, H + 2 * Hkv, hd).split([H, Hkv, Hkv], dim=2)  # (B, L, H, D) views
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, L, D) copies
        y = block_sparse_attention(q, k, v, window=self.window, dilation=self.dilation, global_mask=global_mask,
                                   key_padding_mask=key_padding_mask, causal=self.causal)  # (B, H, L, D)
        y = y.transpose(1, 2).contiguous().view(B, L, self.d_model)  # (B, L, H*D) copy
        return self.dropout(self.proj(y))


def set_attention_class(model: torch.nn.Module, cls: type) -> int:
    modules = [m for m in model.modules() if isinstance(m, BlockSparseSelfAttention)]
    for m in modules:
        m.__class__ = cls
    return len(modules)


def alternate(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each step, called in turn `rounds` times after one warm-up call each."""
    for step in steps.values():
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (required by the CUDA kernels)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device, L = args.device, args.length
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cfg, model, B, step = training_step("moe-diffuseq", L, device, args.bf16)

    def train_step(cls: type) -> Callable[[], None]:
        def run() -> None:
            set_attention_class(model, cls)
            step()
        return run

    layers = set_attention_class(model, BlockSparseSelfAttention)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    hd = cfg.d_model // cfg.n_heads
    qkv = torch.randn(B, L, 3 * cfg.n_heads, hd, device=device, dtype=dtype)
    out = torch.randn(B, cfg.n_heads, L, hd, device=device, dtype=dtype)

    def copies() -> None:  # one layer's copies, forward and backward (the gradients take the same copies)
        for _ in range(2):
            for t in qkv.split(cfg.n_heads, dim=2):
                t.transpose(1, 2).contiguous()
            out.transpose(1, 2).contiguous()
        sync()

    # one attention module alone, forward and backward, both ways on the same input
    module = BlockSparseSelfAttention(cfg.d_model, cfg.n_heads, window=cfg.window).to(device)
    x = torch.randn(B, L, cfg.d_model, device=device, requires_grad=True)
    g = torch.zeros(B, L, dtype=torch.bool, device=device)
    g[:, L // 2:L // 2 + 64] = True

    def module_step(cls: type) -> Callable[[], None]:
        def step() -> None:
            module.__class__ = cls
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16):
                y = module(x, g)
            y.float().square().mean().backward()
            sync()
        return step

    medians = alternate({"views": train_step(BlockSparseSelfAttention), "copies": train_step(CopyingAttention),
                         "module views": module_step(BlockSparseSelfAttention),
                         "module copies": module_step(CopyingAttention), "copies alone": copies}, args.rounds)
    copy_bytes = layers * 2 * 4 * B * L * cfg.d_model * qkv.element_size() * 2  # 4 tensors, fwd + bwd, read + write
    saved = medians["copies"] - medians["views"]
    print(f"{machine_description()}; copy bandwidth {copy_bandwidth(device):.1f} GB/s")
    print(f"MoEDiffuSeq {cfg.n_layers} x {cfg.d_model} ({cfg.n_heads} heads of {hd}), L = {L}, B = {B}, "
          f"{dtype}, {layers} attention layers, {args.rounds} alternated rounds, medians:")
    print(f"  training step, views read in place: {medians['views'] * 1e3:.1f} ms")
    print(f"  training step, with transposed copies: {medians['copies'] * 1e3:.1f} ms "
          f"({saved * 1e3:+.1f} ms, {100 * saved / medians['copies']:.1f}% of that step)")
    module_saved = medians["module copies"] - medians["module views"]
    print(f"  one attention module, fwd + bwd: views {medians['module views'] * 1e3:.1f} ms, copies "
          f"{medians['module copies'] * 1e3:.1f} ms ({module_saved * 1e3:+.1f} ms, "
          f"{100 * module_saved / medians['module copies']:.1f}%)")
    print(f"  the copies alone: {layers * medians['copies alone'] * 1e3:.1f} ms for {copy_bytes / 1e6:.0f} MB moved "
          f"({copy_bytes / (layers * medians['copies alone']) / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
