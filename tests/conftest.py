"""Shared test configuration: hypothesis profiles and the device fixture (helpers: utils.py).

Profiles (select with MOEDIFFUSEQ_HYPOTHESIS_PROFILE): "ci" (default; derandomized, sized
to CI's time on 2 cores), "deep" (>= 1000 examples per property, for kernel work: a property
that ran fewer fails the session, by name) and "gpu"
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

DEEP_MIN_EXAMPLES = 1000
_examples_run: dict = {}  # "test id: property" -> examples run to completion (the deep profile only)
_running = [""]  # the id of the running test (properties are often inner functions of one name)


def _count_example(observation) -> None:
    if observation.type == "test_case" and observation.status == "passed":
        key = f"{_running[0]}: {observation.property}"
        _examples_run[key] = _examples_run.get(key, 0) + 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _running[0] = item.nodeid
    yield


if settings.get_current_profile_name() == "deep":
    # max_examples is a cap: hypothesis stops early on a small search space or many rejected
    # draws, so the examples each property really ran are counted (hypothesis' observability
    # callback) and checked at the end of the session
    from hypothesis.internal.observability import add_observability_callback

    add_observability_callback(_count_example)


def pytest_sessionfinish(session, exitstatus):
    short = {name: n for name, n in _examples_run.items() if n < DEEP_MIN_EXAMPLES}
    if short:
        lines = "\n".join(f"  {name}: {n}" for name, n in sorted(short.items()))
        print(f"\nhypothesis deep profile: properties that ran fewer than {DEEP_MIN_EXAMPLES} examples:\n{lines}")
        session.exitstatus = 1


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu" and "cuda"; the CUDA instance is skipped at run time where CUDA is not usable."""
    skip_unless_ready(request.param)
    return request.param
