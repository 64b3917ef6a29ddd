"""Shared test configuration: hypothesis profiles and the device fixture (helpers: utils.py).

Profiles (select with MOEDIFFUSEQ_HYPOTHESIS_PROFILE): "ci" (default; derandomized, sized
to CI's time on 2 cores), "deep" (>= 1000 examples per property, for kernel work) and "gpu"
(a few examples, no shrinking: the short first runs on a GPU machine, bench/gpu_check.sh).
No CUDA query happens at import time: CUDA tests are marked and skipped at run time.
MOEDIFFUSEQ_STRICT_CUTLASS defaults to 1: a CUTLASS grouped GEMM that refuses a bf16/fp16
problem it should take is an error in the tests (float32 and widths that are not multiples of 8
take the per-expert matmul path by design).
"""
import os

os.environ.setdefault("MOEDIFFUSEQ_STRICT_CUTLASS", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

from utils import DEVICES, skip_unless_ready  # noqa: E402

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


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu" and "cuda"; the CUDA instance is skipped at run time where CUDA is not usable."""
    skip_unless_ready(request.param)
    return request.param
