"""What a user installs: a complete source distribution, the metadata (dependencies split into
extras, one version, an SPDX license), and a clear word when an optional package is missing."""
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import moediffuseq
from moediffuseq.extras import EXTRA_OF_MODULE, missing_extra_message

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_name(req: str) -> str:
    for sep in "<>=![; ":
        req = req.split(sep)[0]
    return req.strip().lower()


def test_core_dependencies_are_the_ops_only():
    project = PYPROJECT["project"]
    assert sorted(_requirement_name(r) for r in project["dependencies"]) == ["numpy", "safetensors", "torch"]
    extras = project["optional-dependencies"]
    assert {"train", "eval", "data", "test", "all"} <= set(extras)
    # every optional module the code imports is provided by the extra that the error names
    provided = {_requirement_name(r).replace("-", "_") for reqs in extras.values() for r in reqs}
    for module, extra in EXTRA_OF_MODULE.items():
        package = {"yaml": "pyyaml"}.get(module, module).replace("-", "_")
        assert package in {_requirement_name(r).replace("-", "_") for r in extras[extra]}, (module, extra)
        assert package in provided


def test_one_version_an_spdx_license_and_typing_marker():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moediffuseq.__version__"}
    assert importlib.metadata.version("moediffuseq") == moediffuseq.__version__
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert (Path(moediffuseq.__file__).parent / "py.typed").is_file()


def _source_tree_copy(destination: Path) -> Path:
    """The checkout's files (tracked and new, not ignored), without build leftovers such as an
    egg-info folder, whose stale file list setuptools would reuse."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def test_sdist_holds_everything_a_build_needs(tmp_path):
    tree = _source_tree_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(tree)],
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("moediffuseq-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for required in ("CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "csrc/registration.cpp",
                     "csrc/autocast.cpp", "cmake/torch.cmake", "cmake/cuda.cmake", "moediffuseq/py.typed"):
        assert required in names, required
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert sources <= names, sorted(sources - names)
    assert not any(n.endswith(".so") or "__pycache__" in n for n in names)


@pytest.mark.parametrize("module", sorted(EXTRA_OF_MODULE))
def test_missing_extra_names_the_install_line(module):
    error = ModuleNotFoundError(f"No module named '{module}'", name=module)
    message = missing_extra_message(error)
    assert message == (f"error: this needs the optional package '{module}': "
                       f"pip install \"moediffuseq[{EXTRA_OF_MODULE[module]}]\"")


def test_a_real_missing_module_is_not_blamed_on_an_extra():
    assert missing_extra_message(ModuleNotFoundError("No module named 'moediffuseq.nope'", name="moediffuseq.nope")) \
        is None
