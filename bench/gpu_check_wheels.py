"""The wheels the GPU check carries to a machine with no network (``make gpu-wheels`` downloads them
into .whl/, the environment stage installs them with pip --no-index --no-deps --target), and what
the check imports, found by reading the sources it runs.

The GPU machine has its own CUDA torch (with torch's own dependencies), nvcc, cmake, ninja and
pybind11; everything else the check imports is carried, pinned, for CPython 3.12 on manylinux
x86_64. ``imports_of_the_check()`` follows the local imports (moediffuseq, bench, the tests' own
modules) from the stages' entry files and returns every third-party top-level module, lazy imports
included; each must be carried (WHEELS), on the machine (MACHINE) or named in NOT_RUN with why the
check never reaches it. tests/test_gpu_check.py asserts that partition, that the carried set is
closed under the wheels' own requirements, and that a wheel folder holds exactly the pinned files.

    python -m bench.gpu_check_wheels list              # NAME==VERSION lines (make gpu-wheels reads them)
    python -m bench.gpu_check_wheels verify .whl       # the folder holds exactly these wheels
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent

# (distribution, version, top-level module or "" for a dependency only)
WHEELS = (
    ("nvidia-cutlass", "4.2.0.0", "cutlass_library"),  # CUTLASS/CuTe headers of the build
    ("pytest", "9.2.0", "pytest"),
    ("pluggy", "1.7.0", ""),
    ("iniconfig", "2.3.1", ""),
    ("packaging", "26.4", ""),
    ("pygments", "2.21.0", ""),
    ("hypothesis", "6.170.29", "hypothesis"),
    ("sortedcontainers", "2.4.0", ""),
    ("expecttest", "0.3.0", "expecttest"),  # torch.library.opcheck
    ("numpy", "2.4.6", "numpy"),
    ("safetensors", "0.8.0", "safetensors"),
    ("tokenizers", "0.23.3", "tokenizers"),
    ("tqdm", "4.70.1", "tqdm"),
    ("pyyaml", "6.0.4", "yaml"),
    ("nltk", "3.10.4", "nltk"),  # sentence BLEU of the end-to-end quality row
    ("regex", "2026.12.2", ""),
    ("joblib", "1.6.0", ""),
    ("cloudpickle", "3.1.3", ""),
    ("click", "8.5.1", ""),
    ("defusedxml", "0.7.1", ""),
    ("sacrebleu", "2.6.0", "sacrebleu"),
    ("portalocker", "4.4.2", ""),
    ("tabulate", "0.10.0", ""),
    ("colorama", "0.4.6", ""),
    ("lxml", "6.2.1", ""),
)
# On the GPU machine: torch and its own requirements, pybind11 (and the standard library).
MACHINE = frozenset({"torch", "pybind11", "filelock", "typing_extensions", "sympy", "mpmath", "networkx", "jinja2",
                     "markupsafe", "fsspec", "setuptools", "triton"})
MACHINE_DISTS = frozenset({"torch", "pybind11", "filelock", "typing-extensions", "sympy", "mpmath", "networkx",
                           "jinja2", "markupsafe", "fsspec", "setuptools", "triton"})
# Imported somewhere the check's code reaches, never run by the check.
NOT_RUN = {
    "transformers": "the transformers integration is not part of the check",
    "matplotlib": "figures (loss.png, bench figures) are not drawn by the check",
    "huggingface_hub": "no model is fetched from the Hub (no network)",
    "aclsum": "the aclsum corpus is not loaded (end_to_end uses its own corpus)",
    "tensorboard": "no TensorBoard logging in the check",
    "rouge_score": "ROUGE of the quality runs: end_to_end runs with --quality-steps 0 in the check",
}
# Carried modules that no Python file of the check imports by name: who needs them.
INDIRECT = {
    "cutlass_library": "the CMake build locates the CUTLASS headers through it",
    "expecttest": "torch.library.opcheck in the tests",
    "numpy": "sacrebleu and nltk; torch's tensor <-> numpy conversions",
    "yaml": "moediffuseq's config files (cli_train)",
}
# Requirements of carried wheels that are not carried: why the check does without them.
DEPS_NOT_CARRIED = {
    "cuda-python": "nvidia-cutlass: only its headers and `import cutlass_library` are used, which need none",
    "pydot": "nvidia-cutlass (as above)",
    "scipy": "nvidia-cutlass (as above)",
    "treelib": "nvidia-cutlass (as above)",
    "huggingface-hub": "tokenizers: only Tokenizer.from_pretrained uses it, and the check fetches nothing",
}
PLATFORM_ARGS = ("--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                 "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")

# The files the stages run (relative to the root); local imports are followed from them.
ENTRY_FILES = ("bench/gpu_check.py", "bench/gpu_smoke.py", "bench/gpu_sanitize_case.py", "bench/attention.py",
               "bench/moe.py", "bench/diffusion.py", "bench/end_to_end.py", "tests/conftest.py", "tests/utils.py",
               "setup.py")
LOCAL_TOP = ("moediffuseq", "bench")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines() -> list[str]:
    return [f"{dist}=={version}" for dist, version, _ in WHEELS]


def _module_file(dotted: str) -> Optional[Path]:
    parts = dotted.split(".")
    for base in (ROOT, ROOT / "tests", ROOT / "cmake"):
        path = base.joinpath(*parts)
        if path.with_suffix(".py").is_file():
            return path.with_suffix(".py")
        if (path / "__init__.py").is_file():
            return path / "__init__.py"
    return None


def imports_of_the_check(entry_files: Iterable[str]) -> set[str]:
    """Third-party top-level modules imported (anywhere in a file, lazily too) by the entry files
    and the local modules they reach."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    seen: set[Path] = set()
    todo = [ROOT / f for f in entry_files]
    found: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: the package's own modules
                package = path.parent
                for _ in range(node.level - 1):
                    package = package.parent
                stem = ".".join(package.relative_to(ROOT).parts)
                names = [f"{stem}.{node.module}" if node.module else stem]
                names += [f"{names[0]}.{alias.name}" for alias in node.names]
            for name in names:
                top = name.split(".")[0]
                local = _module_file(name)
                if local is not None:
                    todo.append(local)
                    package = local.parent
                    while (package / "__init__.py").is_file() and package != ROOT:
                        todo.append(package / "__init__.py")
                        package = package.parent
                elif top not in stdlib and top not in LOCAL_TOP and _module_file(top) is None:
                    found.add(top)
    return found


def check_wheel_dir(folder: Path) -> list[str]:
    """Problems of a wheel folder against WHEELS: missing, unpinned or unexpected wheel files."""
    wanted = {normalize(dist): version for dist, version, _ in WHEELS}
    have: dict[str, list[str]] = {}
    problems = []
    for wheel in sorted(folder.glob("*.whl")):
        dist, version = wheel.name.split("-")[:2]
        have.setdefault(normalize(dist), []).append(version)
    for dist, version in wanted.items():
        if dist not in have:
            problems.append(f"missing {dist}=={version}")
        elif have[dist] != [version]:
            problems.append(f"{dist}: wanted {version}, found {', '.join(have[dist])}")
    problems += [f"unexpected {dist} {', '.join(v)}" for dist, v in have.items() if dist not in wanted]
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["list"]:
        print("\n".join(requirement_lines()))
        return 0
    if argv[:1] == ["platform-args"]:
        print(" ".join(PLATFORM_ARGS))
        return 0
    if argv[:1] == ["verify"] and len(argv) == 2:
        problems = check_wheel_dir(Path(argv[1]))
        for line in problems:
            print(f"gpu wheels: {line} in {argv[1]} (make gpu-wheels fetches them)")
        if not problems:
            print(f"gpu wheels: {argv[1]} holds the {len(WHEELS)} pinned wheels")
        return 1 if problems else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
