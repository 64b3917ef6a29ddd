"""What a user installs: a complete source distribution, the metadata (dependencies split into
extras, one version, an SPDX license), and a clear word when an optional package is missing."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import torch

import moediffuseq
from moediffuseq.extras import extra_of_module, missing_extra_message

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
    # read from the installed metadata: every package of an extra but the tests', under its module name
    listed = {_requirement_name(r) for name, reqs in extras.items() if name != "test" for r in reqs} - {"moediffuseq"}
    assert {{"yaml": "pyyaml"}.get(m, m) for m in extra_of_module()} == {p.replace("-", "_") for p in listed}
    assert extra_of_module()["tokenizers"] == "train"  # the first extra that lists it
    for module, extra in extra_of_module().items():
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


@pytest.mark.parametrize("module", sorted(extra_of_module()))
def test_missing_extra_names_the_install_line(module):
    error = ModuleNotFoundError(f"No module named '{module}'", name=module)
    message = missing_extra_message(error)
    assert message == (f"error: this needs the optional package '{module}': "
                       f"pip install \"moediffuseq[{extra_of_module()[module]}]\"")


def test_a_real_missing_module_is_not_blamed_on_an_extra():
    assert missing_extra_message(ModuleNotFoundError("No module named 'moediffuseq.nope'", name="moediffuseq.nope")) \
        is None


def test_build_isolation_stops_at_once_with_the_commands(tmp_path):
    """Under pip's build isolation torch is hidden: the backend refuses before installing any
    build tool, naming the commands that work."""
    venv = tmp_path / "empty"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "wheel", "--no-deps", "--wheel-dir",
                             str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "torch is not importable in this build environment" in output
    assert "pip install --no-build-isolation moediffuseq" in output
    assert "Collecting cmake" not in output and "Collecting nvidia-cutlass" not in output


def test_build_record_is_beside_the_extension_and_matches():
    from moediffuseq.build_info import read_build_config

    built = read_build_config()
    assert built is not None, "the build wrote no _build_config.json beside _C"
    assert built["torch"] == torch.__version__ and built["torch_cuda"] == (torch.version.cuda or "")
    assert built["cuda_kernels"] == moediffuseq.build_info().has_cuda


@pytest.mark.parametrize("built,runtime,cuda,problem", [
    ({"torch": "2.13.0+cpu", "torch_cuda": "", "cuda_kernels": False}, "2.13.0+cu130", "13.0", None),
    ({"torch": "2.13.0+cu130", "torch_cuda": "13.0", "cuda_kernels": False}, "2.13.0+cpu", None, None),
    ({"torch": "2.13.0+cpu", "torch_cuda": "", "cuda_kernels": False}, "2.14.1+cpu", None,
     "built for torch 2.13.0+cpu but torch 2.14.1+cpu is installed"),
    ({"torch": "2.13.0+cu130", "torch_cuda": "13.0", "cuda_kernels": True}, "2.13.0+cpu", None,
     "the installed torch 2.13.0+cpu is a CPU build"),
    ({"torch": "2.13.0+cu130", "torch_cuda": "13.0", "cuda_kernels": True}, "2.13.0+cu126", "12.6",
     "built for CUDA 13.0 but torch 2.13.0+cu126 uses CUDA 12.6"),
])
def test_a_build_for_another_torch_gets_one_clear_message(built, runtime, cuda, problem):
    from moediffuseq.build_info import torch_mismatch

    message = torch_mismatch(built, runtime, cuda)
    if problem is None:
        assert message is None
    else:
        assert problem in message and "pip install --no-build-isolation --force-reinstall" in message


def test_import_checks_the_build_record_before_loading_the_extension(tmp_path):
    """A package whose record says another torch stops at import with the message, not with an
    undefined symbol from _C."""
    package = tmp_path / "moediffuseq"
    shutil.copytree(Path(moediffuseq.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_build_config.json").write_text('{"torch": "2.99.0", "torch_cuda": "", "cuda_kernels": false}')
    result = subprocess.run([sys.executable, "-c", "import moediffuseq"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"ImportError: moediffuseq was built for torch 2.99.0 but torch {torch.__version__} is installed" \
        in result.stderr


def test_extension_has_no_absolute_runpath():
    """A wheel installed into another environment must not look for torch in the build's."""
    dynamic = subprocess.run(["readelf", "-d", moediffuseq._C.__file__], check=True, capture_output=True,
                             text=True).stdout
    paths = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "RPATH" in line or "RUNPATH" in line]
    for entry in ":".join(paths).split(":"):
        assert not entry or entry.startswith("$ORIGIN"), f"absolute run path {entry!r} in {moediffuseq._C.__file__}"


def _make_install_commands(tmp_path, gpu: bool) -> str:
    """The commands `make install` would run (make -n) on a machine with or without a GPU,
    told apart by a working nvidia-smi on PATH."""
    bin_dir = tmp_path / ("gpu" if gpu else "cpu")
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n" if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True).stdout


def test_make_installs_the_cpu_torch_without_a_gpu_and_the_default_with_one(tmp_path):
    without_gpu = _make_install_commands(tmp_path, gpu=False)
    assert "--index-url https://download.pytorch.org/whl/cpu" in without_gpu
    assert '--no-index --no-deps "torch==2.13.0"' in without_gpu  # a local CPU wheel first, offline
    with_gpu = _make_install_commands(tmp_path, gpu=True)
    assert "torch==2.13.0" in with_gpu and "download.pytorch.org" not in with_gpu


def test_editable_rebuild_recompiles_nothing_when_nothing_changed():
    """pip install -e . keeps its CMake tree (build/cmake-<python>-torch<version>): a second
    install of unchanged sources compiles nothing."""
    if not Path(moediffuseq.__file__).resolve().is_relative_to(ROOT):
        pytest.skip("moediffuseq is not installed from this checkout")
    (tree,) = (ROOT / "build").glob(f"cmake-*-torch{torch.__version__}")

    def built() -> list[str]:  # ninja logs every command it runs; the glob check runs every time
        lines = (tree / ".ninja_log").read_text().splitlines()[1:]
        return [line.split("\t")[3] for line in lines if "verify_globs" not in line]

    before = len(built())
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
                             str(ROOT)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = built()[before:]
    assert not ran, f"compiled or linked again for unchanged sources: {ran}"


_CUDA_TORCH_SIMULATION = '''
import importlib.abc, importlib.util, sys

class _CudaTorch(importlib.abc.MetaPathFinder):
    """torch.version.cuda = "13.0": this torch presents itself as a CUDA build."""
    def find_spec(self, name, path, target=None):
        if name != "torch.version":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.cuda = "13.0"
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _CudaTorch())
'''


def _configure(tmp_path, python: str, cuda: str, simulate_cuda_torch: bool):
    """CMake configure of the extension with no nvcc anywhere on PATH (the usual pip or conda
    CUDA torch without the toolkit)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", "PYTHONPATH")}
    env["PATH"] = f"{Path(python).parent}:{Path(sys.executable).parent}:/usr/bin:/bin"
    if simulate_cuda_torch:
        (tmp_path / "site").mkdir(exist_ok=True)
        (tmp_path / "site" / "sitecustomize.py").write_text(_CUDA_TORCH_SIMULATION)
        env["PYTHONPATH"] = str(tmp_path / "site")
    return subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / f"build-{cuda}"), "-GNinja",
                           f"-DPython_EXECUTABLE={python}", f"-DMOEDIFFUSEQ_CUDA={cuda}"],
                          env=env, capture_output=True, text=True, timeout=600)


def _cuda_torch_pythons():
    pythons = [pytest.param(sys.executable, True, id="simulated-cuda-torch")]
    real = os.environ.get("CUDA_TORCH_PYTHON")
    pythons.append(pytest.param(real, False, id="real-cuda-torch", marks=pytest.mark.skipif(
        not real, reason="set CUDA_TORCH_PYTHON to a Python with a CUDA build of torch")))
    return pythons


@pytest.mark.parametrize("python,simulate", _cuda_torch_pythons())
def test_cuda_torch_without_the_toolkit_builds_the_cpu_kernels(tmp_path, python, simulate):
    """AUTO: one line and the CPU kernels; ON: a clear error. torch's own CMake config (which
    demands the CUDA libraries before the project can choose) is not involved."""
    auto = _configure(tmp_path, python, "AUTO", simulate)
    output = auto.stdout + auto.stderr
    assert auto.returncode == 0, output[-3000:]
    assert re.search(r"moediffuseq: torch \S+ \(CUDA \d+\.\d+\)", output), output[-3000:]
    assert "building the CPU kernels only (no nvcc found" in output
    assert "Caffe2" not in output and "-gencode" not in output
    on = _configure(tmp_path, python, "ON", simulate)
    assert on.returncode != 0
    assert "MOEDIFFUSEQ_CUDA=ON but no nvcc found: install the CUDA toolkit" in " ".join((on.stdout + on.stderr).split())


def _cli_without(modules: list[str], *argv: str, cwd=None) -> subprocess.CompletedProcess:
    """The moediffuseq command in a fresh process where ``modules`` cannot be imported, as in an
    environment that has the core install only."""
    code = ("import sys\n"
            f"for name in {modules!r}: sys.modules[name] = None  # import of it raises ModuleNotFoundError\n"
            "from moediffuseq.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


OPTIONAL = ["tokenizers", "tqdm", "yaml", "sacrebleu", "rouge_score", "nltk", "aclsum", "matplotlib"]


def test_the_cli_names_the_extra_a_command_needs(tmp_path):
    info = _cli_without(OPTIONAL, "info")
    assert info.returncode == 0, info.stderr[-2000:]
    help_text = _cli_without(OPTIONAL, "generate", "--help")
    assert help_text.returncode == 0 and "--dtype" in help_text.stdout, help_text.stderr[-2000:]
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text('{"src": "a b c", "trg": "c b a"}\n' * 8)
    train = _cli_without(["tokenizers"], "train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
                         "--device", "cpu")
    assert train.returncode == 2
    assert train.stderr.strip().splitlines()[-1] == \
        "error: this needs the optional package 'tokenizers': pip install \"moediffuseq[train]\""
    gens = tmp_path / "gens.jsonl"
    gens.write_text('{"source": "a", "reference": "b c", "hypothesis": "b c", "candidates": ["b c"]}\n')
    evaluate = _cli_without(["sacrebleu", "nltk", "rouge_score"], "evaluate", str(gens))
    assert evaluate.returncode == 2
    assert "pip install \"moediffuseq[eval]\"" in evaluate.stderr and "Traceback" not in evaluate.stderr


def _install_check_plan(env_torch_spec):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_SPEC"}
    if env_torch_spec is not None:
        env["TORCH_SPEC"] = env_torch_spec
    result = subprocess.run(["bash", str(ROOT / "cmake" / "install_check.sh"), "--plan", sys.executable],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_install_check_empty_torch_spec_uses_the_installed_torch():
    """TORCH_SPEC unset: the build's torch release; set: that one; set and empty: no download,
    the installed torch through a fresh environment with the system's packages."""
    release = torch.__version__.split("+")[0]
    assert f"torch: torch=={release} (pip" in _install_check_plan(None)
    assert "torch: torch==2.5.0 (pip" in _install_check_plan("torch==2.5.0")
    assert "torch: the installed torch (fresh environment with --system-site-packages)" in _install_check_plan("")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_with_an_empty_torch_spec_installs_no_torch(tmp_path):
    """`make test ... TORCH_SPEC=`: neither the install (into a new environment) nor install-check
    downloads a torch (make -n: the recipes, nothing run)."""
    def recipes(*spec):
        result = subprocess.run(["make", "-n", "-C", str(ROOT), "install-check", f"VENV={tmp_path / 'venv'}",
                                 *spec], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    default = recipes()
    assert re.search(r"pip install .*\"torch==", default)
    assert 'TORCH_SPEC="torch==' in default
    empty = recipes("TORCH_SPEC=")
    assert not re.search(r"pip install .*torch", empty), empty
    assert 'TORCH_SPEC="" bash cmake/install_check.sh' in empty
