"""Helpers shared by the tests: device lists, dtypes per device, the tolerance rule, the
attention tests' input builder, the README's Python snippets, the small training run's model
flags and corpus.

Plain functions and constants, no fixtures (those live in conftest.py). No CUDA query happens
at import time: ``cuda_ready`` is called by tests at run time only.
"""
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root


def bench_command(module: str) -> list[str]:
    """``python -m <module>`` (a bench module) as from the repository root, except that the
    moediffuseq the tests run against is imported first: the installed one when the tests run
    from an unpacked source distribution, whose moediffuseq/ sources (no compiled _C) would
    otherwise shadow it. Arguments follow the returned command."""
    code = ("import runpy, sys; sys.path[:1] = []; import moediffuseq; "
            f"sys.path.append({str(ROOT)!r}); runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]
README = ROOT / "README.md"

DEVICES = ("cpu", "cuda")

# The dtypes the diffusion ops are tested in on each device (float16 on CUDA only).
DEVICE_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}

# Absolute error floors per dtype, scaled by the magnitude of the reference (CONVENTIONS §9):
# a kernel passes when its error is within 2x the error of the same computation done with
# plain PyTorch ops in the same dtype, plus this floor.
ERROR_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


@functools.lru_cache(maxsize=None)
def cuda_ready() -> bool:
    """True when a GPU is visible and the extension was built with its CUDA kernels; False when
    no GPU is visible. A GPU with a build that lacks the CUDA kernels fails the calling test
    (every CUDA test would otherwise be skipped silently and a broken CUDA build look green),
    unless MOEDIFFUSEQ_TESTS_CPU_BUILD_OK=1 says that build is meant.

    Called by tests at run time only (never at import or collection time).
    """
    if not torch.cuda.is_available():
        return False
    import moediffuseq

    if moediffuseq.build_info().has_cuda:
        return True
    if os.environ.get("MOEDIFFUSEQ_TESTS_CPU_BUILD_OK") == "1":
        return False
    pytest.fail("a GPU is visible but the moediffuseq extension was built without its CUDA kernels: rebuild with "
                "MOEDIFFUSEQ_CUDA=ON (or set MOEDIFFUSEQ_TESTS_CPU_BUILD_OK=1 to skip the CUDA tests on purpose)",
                pytrace=False)


def skip_unless_ready(device: str) -> None:
    """Skips the running test when ``device`` is "cuda" and CUDA is not usable."""
    if device == "cuda" and not cuda_ready():
        pytest.skip("no CUDA device, or the CUDA kernels are not built")


def assert_close_to_reference(actual, reference, same_dtype_baseline, what="", compute_dtype=None):
    """|actual - reference| <= 2 |baseline - reference| + floor, elementwise maximum.

    ``reference`` is computed in float64; ``same_dtype_baseline`` is the plain PyTorch
    computation in the same dtypes as ``actual``. The floor is that of ``compute_dtype``
    (default: the dtype of ``actual``), for float32 outputs computed from bfloat16 inputs.
    """
    ref = reference.double()
    err = (actual.double() - ref).abs().max().item() if actual.numel() else 0.0
    base = (same_dtype_baseline.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    bound = 2.0 * base + ERROR_FLOOR[compute_dtype or actual.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (same-dtype baseline error {base:.3e})"


# block_sparse_attention (tests/test_block_sparse_attention*.py): dtypes and head dimensions per
# device, and the inputs of one problem drawn on the CPU from one seed, then moved.
ATTENTION_CPU_DTYPES = [torch.float32, torch.bfloat16]  # CPU
ATTENTION_DTYPES = {"cpu": ATTENTION_CPU_DTYPES, "cuda": [torch.bfloat16, torch.float16]}
ATTENTION_HEAD_DIMS = {"cpu": [1, 8, 16, 40, 64, 72, 128], "cuda": [64, 128]}
ATTENTION_CASES = [(d, t) for d in DEVICES for t in ATTENTION_DTYPES[d]]
ATTENTION_CASE_IDS = [f"{d}-{str(t).removeprefix('torch.')}" for d, t in ATTENTION_CASES]


def head_dim(device, cpu_dim):
    """``cpu_dim`` on CPU; on CUDA the nearest head dimension the kernels support."""
    return cpu_dim if device == "cpu" else (64 if cpu_dim <= 64 else 128)


def default_dtype(device):
    """The dtype the attention tests use where they take one: float32 on CPU, bfloat16 on CUDA."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def shape_of(B, H, L, D, layout):
    return (B, H, L, D) if layout == "bhld" else (B, L, H, D)


def make_inputs(B, H, L, D, dtype, seed, p_global=0.0, p_pad=0.0, pad_batch=False, device="cpu", kv_heads=None,
                layout="bhld"):
    """q (and grad) with H heads, k and v with kv_heads (default H), all in ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    Hkv = H if kv_heads is None else kv_heads
    q, k, v = (torch.randn(shape_of(B, h, L, D, layout), generator=gen).to(device=device, dtype=dtype)
               for h in (H, Hkv, Hkv))
    global_mask = (torch.rand(B, L, generator=gen) < p_global).to(device) if p_global > 0 else None
    key_padding_mask = (torch.rand(B, L, generator=gen) < p_pad).to(device) if p_pad > 0 else None
    if pad_batch:  # the last batch element has every key padded
        key_padding_mask = key_padding_mask if key_padding_mask is not None else torch.zeros(B, L, dtype=torch.bool)
        key_padding_mask = key_padding_mask.to(device)
        key_padding_mask[-1] = True
    grad = torch.randn(shape_of(B, H, L, D, layout), generator=gen).to(device=device, dtype=dtype)
    return q, k, v, global_mask, key_padding_mask, grad


def run_with_grads(fn, q, k, v, grad, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


def readme_python_snippets(inside: Optional[str] = None, outside: Optional[str] = None) -> list[str]:
    """The README's ```python blocks, in order: those of the section headed ``inside`` only, or
    all but those of the section headed ``outside`` (a section ends at the next "## " heading)."""
    text = README.read_text()
    heading = inside or outside
    if heading is not None and (inside is not None or heading in text):
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        if inside is not None:
            text = text[start:end if end > 0 else None]
        else:
            text = text[:start] + (text[end:] if end > 0 else "")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


# The small model of the training tests (tests/test_train.py, tests/test_fault_injection.py), as
# `moediffuseq train` flags.
SMALL_MODEL_SET = ["--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "d_emb=16",
                   "--set", "window=4", "--set", "num_experts=2", "--set", "d_expert=32",
                   "--set", "diffusion_steps=100"]


def write_reversal_corpus(directory: Path, sizes: dict[str, int]) -> Path:
    """DiffuSeq jsonl splits (``{"train": 96, ...}`` examples each) of the task "reverse a short
    list of words", drawn from one seeded generator; returns ``directory``."""
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for split, n in sizes.items():
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                seq = [words[i] for i in torch.randint(0, len(words), (int(torch.randint(2, 6, (1,), generator=g)),),
                                                       generator=g)]
                f.write(json.dumps({"src": " ".join(seq), "trg": " ".join(reversed(seq))}) + "\n")
    return directory
