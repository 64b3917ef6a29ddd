"""Shared test configuration: hypothesis profiles, devices, tolerances.

Profiles (select with MOEDIFFUSEQ_HYPOTHESIS_PROFILE): "ci" (default; derandomized, sized
to CI's time on 2 cores), "deep" (>= 1000 examples per property, for kernel work) and "gpu"
(a few examples, no shrinking: the short first runs on a GPU machine, bench/gpu_check.sh).
No CUDA query happens at import time: CUDA tests are marked and skipped at run time.
MOEDIFFUSEQ_STRICT_CUTLASS defaults to 1: a CUTLASS grouped GEMM that refuses a bf16/fp16
problem it should take is an error in the tests (float32 and widths that are not multiples of 8
take the per-expert matmul path by design).
"""
import functools
import os

os.environ.setdefault("MOEDIFFUSEQ_STRICT_CUTLASS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "deep",
    deadline=None,
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "gpu",
    deadline=None,
    derandomize=True,
    max_examples=10,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target),  # no shrinking
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("MOEDIFFUSEQ_HYPOTHESIS_PROFILE", "ci"))

# Absolute error floors per dtype, scaled by the magnitude of the reference (CONVENTIONS §9):
# a kernel passes when its error is within 2x the error of the same computation done with
# plain PyTorch ops in the same dtype, plus this floor.
ERROR_FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}


DEVICES = ("cpu", "cuda")


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


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu" and "cuda"; the CUDA instance is skipped at run time where CUDA is not usable."""
    skip_unless_ready(request.param)
    return request.param
