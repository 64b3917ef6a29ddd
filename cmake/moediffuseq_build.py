"""The build backend: setuptools', with the build tools asked for only once torch is known to be
importable. The extension links to the torch that is already installed (the ABI it must match),
so it builds without pip's build isolation; under isolation torch is hidden, and the build stops
at once, before any tool is installed, with the commands to use.
"""
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook as setuptools has it)

# the build tools, listed once in build-requirements.txt beside this file
BUILD_TOOLS = tuple(line.strip() for line in (Path(__file__).parent / "build-requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#"))

NO_TORCH = """moediffuseq: torch is not importable in this build environment.
moediffuseq's kernels are compiled against the torch that is already installed, which pip's build
isolation hides. Install torch first, then build without isolation:
    pip install torch
    pip install {tools}
    pip install --no-build-isolation moediffuseq      (from a checkout: pip install --no-build-isolation .)"""


def require_torch() -> str:
    """The version of the importable torch; exits with the commands to use when there is none."""
    try:
        import torch
    except ImportError:
        raise SystemExit(NO_TORCH.format(tools=" ".join(f'"{t}"' for t in BUILD_TOOLS))) from None
    return torch.__version__


def get_requires_for_build_wheel(config_settings=None):
    require_torch()
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *BUILD_TOOLS]


def get_requires_for_build_editable(config_settings=None):
    require_torch()
    return [*_setuptools.get_requires_for_build_editable(config_settings), *BUILD_TOOLS]
