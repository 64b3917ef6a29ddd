"""The build backend: setuptools', with the build environment checked before anything runs.

The extension links to the torch that is already installed (the ABI it must match), so it builds
without pip's build isolation; under isolation torch is hidden, and the build stops at once,
before any tool is installed, with the commands to use. Without isolation every hook that builds
first checks torch and the tools of build-requirements.txt (and, when the CUDA kernels will be
built, cuda-requirements.txt) and names what is missing with the one pip command that installs
it, instead of a CMake error (or an old setuptools' complaint about pyproject.toml) later.
"""
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

try:
    from setuptools import build_meta as _setuptools
    from setuptools.build_meta import *  # noqa: F401,F403  (every other hook as setuptools has it)
except ImportError:  # `python cmake/moediffuseq_build.py --requirements` in a venv without setuptools yet
    if __name__ != "__main__":
        raise

HERE = Path(__file__).parent


def _requirements(name: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (HERE / name).read_text().splitlines()
                 if line.strip() and not line.startswith("#"))


BUILD_TOOLS = _requirements("build-requirements.txt")  # every build
CUDA_TOOLS = _requirements("cuda-requirements.txt")    # the CUDA kernels: CUTLASS's headers

NO_TORCH = """moediffuseq: torch is not importable in this build environment.
moediffuseq's kernels are compiled against the torch that is already installed, which pip's build
isolation hides. Install torch first, then build without isolation:
    pip install torch
    pip install {tools}
    pip install --no-build-isolation moediffuseq      (from a checkout: pip install --no-build-isolation .)"""


def _pip_args(requirements) -> str:
    return " ".join(f'"{r}"' if re.search(r"[<>=!]", r) else r for r in requirements)


def require_torch() -> str:
    """The version of the importable torch; exits with the commands to use when there is none."""
    try:
        import torch
    except ImportError:
        raise SystemExit(NO_TORCH.format(tools=_pip_args(BUILD_TOOLS))) from None
    return torch.__version__


def tool_dirs() -> list[str]:
    """Where the build looks for cmake and ninja: the building Python's own bin directory (where
    pip puts them, on PATH or not), then PATH."""
    return [str(Path(sys.executable).parent), *filter(None, os.environ.get("PATH", "").split(os.pathsep))]


def build_env() -> dict[str, str]:
    """The environment CMake runs in: PATH led by the building Python's bin directory."""
    return {**os.environ, "PATH": os.pathsep.join(dict.fromkeys(tool_dirs()))}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:4])


def _satisfies(found: str, op: str, wanted: str) -> bool:
    have, need = _version_tuple(found), _version_tuple(wanted)
    width = max(len(have), len(need))
    have, need = have + (0,) * (width - len(have)), need + (0,) * (width - len(need))
    return {">=": have >= need, "==": have == need, ">": have > need, "<": have < need, "<=": have <= need,
            "!=": have != need}[op]


def _executable_version(name: str) -> str | None:
    """The version an executable reports, '' when it runs but says none, None when not found."""
    path = shutil.which(name, path=os.pathsep.join(tool_dirs()))
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\d+(\.\d+)+", out)
    return match.group(0) if match else ""


def _module_version(module: str, distribution: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # importable without pip's metadata (a system package)
        return ""


# how each tool of the requirement files is found: an executable, or a module and its distribution
_PROBES = {
    "cmake": lambda: _executable_version("cmake"),
    "ninja": lambda: _executable_version("ninja"),
    "pybind11": lambda: _module_version("pybind11", "pybind11"),
    "nvidia-cutlass": lambda: _module_version("cutlass_library", "nvidia-cutlass"),
}


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_tools(requirements) -> list[tuple[str, str]]:
    """(requirement, what was found) for each requirement that this environment does not meet."""
    missing = []
    for requirement in requirements:
        name, op, wanted = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:([<>=!]=?)\s*(\S+))?", requirement).groups()
        found = _PROBES.get(name.lower(), lambda: _distribution_version(name))()
        if found is None:
            missing.append((requirement, "not found"))
        elif op and found and not _satisfies(found, op, wanted):
            missing.append((requirement, f"found {found}"))
    return missing


def _nvcc_found() -> bool:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "nvcc"))
    return any(c and os.path.isfile(c) for c in candidates)


def builds_cuda_kernels() -> bool:
    """Whether CMake will build the CUDA kernels (cmake/cuda.cmake decides the same way):
    MOEDIFFUSEQ_CUDA=ON, or AUTO with a CUDA build of torch and an nvcc."""
    mode = os.environ.get("MOEDIFFUSEQ_CUDA", "AUTO")
    for arg in shlex.split(os.environ.get("CMAKE_ARGS", "")):  # a -D option there wins, as in CMake
        match = re.fullmatch(r"-DMOEDIFFUSEQ_CUDA(?::\w+)?=(.*)", arg)
        mode = match.group(1) if match else mode
    mode = mode.upper()
    if mode in ("OFF", "0", "FALSE", "NO"):
        return False
    if mode in ("ON", "1", "TRUE", "YES"):
        return True
    import torch
    return bool(torch.version.cuda) and _nvcc_found()


def check_setuptools() -> None:
    """Exits naming the command when the setuptools at hand is too old for pyproject.toml."""
    _exit_if_missing([r for r in BUILD_TOOLS if r.startswith("setuptools")])


def check_build_environment() -> str:
    """Before CMake: torch importable and every build tool present (CUTLASS too when the CUDA
    kernels will be built); exits with one short message and the pip command otherwise.
    Returns torch's version."""
    version = require_torch()
    _exit_if_missing(BUILD_TOOLS + (CUDA_TOOLS if builds_cuda_kernels() else ()))
    return version


def _exit_if_missing(requirements) -> None:
    missing = missing_tools(requirements)
    if missing:
        found = ", ".join(f"{r} ({what})" for r, what in missing)
        raise SystemExit(f"moediffuseq: the build needs {found}; install with:\n"
                         f"    {sys.executable} -m pip install {_pip_args(r for r, _ in missing)}")


def get_requires_for_build_wheel(config_settings=None):
    require_torch()
    cuda = CUDA_TOOLS if builds_cuda_kernels() else ()
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *BUILD_TOOLS, *cuda]


def get_requires_for_build_editable(config_settings=None):
    require_torch()
    cuda = CUDA_TOOLS if builds_cuda_kernels() else ()
    return [*_setuptools.get_requires_for_build_editable(config_settings), *BUILD_TOOLS, *cuda]


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    check_build_environment()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    check_build_environment()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check_build_environment()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    check_build_environment()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    check_setuptools()
    return _setuptools.build_sdist(sdist_directory, config_settings)


if __name__ == "__main__":
    # python cmake/moediffuseq_build.py --requirements: pip's -r options for this machine's build
    # (`make install` uses it: CUTLASS only where the CUDA kernels will be built)
    if sys.argv[1:] != ["--requirements"]:
        sys.exit("usage: python cmake/moediffuseq_build.py --requirements")
    require_torch()
    files = ["build-requirements.txt", *(["cuda-requirements.txt"] if builds_cuda_kernels() else [])]
    print(" ".join(f"-r {shlex.quote(os.path.relpath(HERE / f))}" for f in files))
