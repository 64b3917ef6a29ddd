"""Helpers shared by the tests: device lists, dtypes per device, the tolerance rule.

Plain functions and constants, no fixtures (those live in conftest.py). No CUDA query happens
at import time: ``cuda_ready`` is called by tests at run time only.
"""
import functools

import pytest
import torch

DEVICES = ("cpu", "cuda")

# The dtypes the diffusion ops are tested in on each device (float16 on CUDA only).
DEVICE_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.float32, torch.bfloat16, torch.float16]}

# Absolute error floors per dtype, scaled by the magnitude of the reference (CONVENTIONS §9):
# a kernel passes when its error is within 2x the error of the same computation done with
# plain PyTorch ops in the same dtype, plus this floor.
ERROR_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


@functools.lru_cache(maxsize=None)
def cuda_ready() -> bool:
    """True when a GPU is visible and the extension was built with its CUDA kernels.

    Called by tests at run time only (never at import or collection time).
    """
    if not torch.cuda.is_available():
        return False
    import moediffuseq

    return bool(moediffuseq.build_info().has_cuda)


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
