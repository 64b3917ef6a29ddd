"""What a user installs: a complete source distribution, the metadata (dependencies split into
extras, one version, an SPDX license), and a clear word when an optional package is missing."""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
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


def _source_files() -> list[str]:
    """The checkout's files (tracked and new, not ignored); in an unpacked source distribution,
    which has no git, its files less the build's leftovers."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                check=True, capture_output=True).stdout.decode().split("\0")
        return list(filter(None, listed))
    leftovers = ("build/", ".pytest_cache/", ".hypothesis/", "moediffuseq.egg-info/", "bench/out/", "runs/")
    return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
            if p.is_file() and not p.relative_to(ROOT).as_posix().startswith(leftovers)
            and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc") and p.name != "_build_config.json"]


def _source_tree_copy(destination: Path) -> Path:
    """The checkout's files (tracked and new, not ignored), without build leftovers such as an
    egg-info folder, whose stale file list setuptools would reuse."""
    for name in _source_files():
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


def test_sdist_carries_the_tests_and_what_they_import(tmp_path):
    """From the unpacked sdist every test module can be collected: bench/, which some import
    and the README names (bench/RESULTS.md), is in it; its outputs are not."""
    tree = _source_tree_copy(tmp_path / "src")
    (tree / "bench" / "out").mkdir(exist_ok=True)
    (tree / "bench" / "out" / "table.md").write_text("a local result\n")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(tree)],
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("moediffuseq-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"bench/__init__.py", "bench/RESULTS.md", "bench/gpu_smoke.py", "tests/utils.py"} <= names
    assert not any(n.startswith("bench/out") for n in names)
    imported = {m for test in (ROOT / "tests").glob("*.py")
                for m in re.findall(r"^(?:from|import) (bench)\b", test.read_text(), re.M)}
    assert imported == {"bench"}
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("*.py")} <= names


def test_readme_links_work_off_the_repository():
    """The README is the package page too, where a relative link leads nowhere: files are named
    by their path (shipped in the sdist), links are absolute."""
    readme = (ROOT / "README.md").read_text()
    relative = re.findall(r"\]\((?!https?://|#)([^)]*)\)", readme)
    assert not relative, f"relative links in README.md: {relative}"
    for path in re.findall(r"`((?:bench|cmake|csrc|tests)/[\w./-]+\.(?:md|txt|py|sh))`", readme):
        assert (ROOT / path).is_file(), f"README.md names {path}, which is not in this tree"


def _backend(code: str, **env) -> subprocess.CompletedProcess:
    """Python code run with the build backend (cmake/moediffuseq_build.py) importable."""
    environ = {**{k: v for k, v in os.environ.items() if k not in ("MOEDIFFUSEQ_CUDA", "CMAKE_ARGS")}, **env}
    return subprocess.run([sys.executable, "-c", f"import moediffuseq_build as backend\n{code}"],
                          cwd=ROOT / "cmake", env=environ, capture_output=True, text=True, timeout=120)


def test_cutlass_is_a_requirement_of_the_cuda_build_only():
    """nvidia-cutlass (and the cuda-python, scipy, networkx it brings) is asked for only when
    the CUDA kernels will be built: not by the CPU build, nor by `make install` for it."""
    def requirement_names(name):
        return [_requirement_name(line) for line in (ROOT / "cmake" / name).read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    assert "nvidia-cutlass" not in requirement_names("build-requirements.txt")
    assert requirement_names("cuda-requirements.txt") == ["nvidia-cutlass"]
    code = """import json, os
asked = {}
for name, env in [("off", {"MOEDIFFUSEQ_CUDA": "OFF"}), ("on", {"CMAKE_ARGS": "-DMOEDIFFUSEQ_CUDA=ON"}), ("auto", {})]:
    os.environ.pop("MOEDIFFUSEQ_CUDA", None), os.environ.pop("CMAKE_ARGS", None), os.environ.update(env)
    asked[name] = [" ".join(backend.get_requires_for_build_wheel()), backend.builds_cuda_kernels()]
print(json.dumps(asked))"""
    run = _backend(code)
    assert run.returncode == 0, run.stderr
    asked = json.loads(run.stdout.splitlines()[-1])  # setuptools prints its own lines first
    assert "nvidia-cutlass" not in asked["off"][0] and "cmake>=3.25" in asked["off"][0] and asked["off"][1] is False
    assert "nvidia-cutlass==" in asked["on"][0] and asked["on"][1] is True
    if not torch.version.cuda:  # AUTO with a CPU torch: the CPU build, nvcc or not
        assert "nvidia-cutlass" not in asked["auto"][0] and asked["auto"][1] is False
    # make install asks before it installs the build tools: a new venv may have no setuptools yet
    no_setuptools = ("import runpy, sys; sys.modules['setuptools'] = None; sys.argv[1:] = ['--requirements']; "
                     "runpy.run_path('cmake/moediffuseq_build.py', run_name='__main__')")
    cli = subprocess.run([sys.executable, "-c", no_setuptools], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "MOEDIFFUSEQ_CUDA": "OFF"})
    assert cli.stdout.split() == ["-r", "cmake/build-requirements.txt"], cli.stderr
    cli = subprocess.run([sys.executable, "cmake/moediffuseq_build.py", "--requirements"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "MOEDIFFUSEQ_CUDA": "ON"})
    assert cli.stdout.split() == ["-r", "cmake/build-requirements.txt", "-r", "cmake/cuda-requirements.txt"]


def test_make_installs_cutlass_for_the_cuda_targets_only(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def commands(*targets):
        return subprocess.run(["make", "-n", "-B", *targets, f"VENV={tmp_path / 'venv'}", "NVCC=/usr/bin/true",
                               "CUDA_TORCH_PYTHON=/opt/cuda-torch/bin/python"], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True).stdout

    install = commands("install")
    assert "cmake/moediffuseq_build.py --requirements" in install and "cuda-requirements" not in install
    assert "cuda-requirements" not in install.replace("moediffuseq_build.py --requirements", "")
    for target in ("cuda-check", "cuda-build"):
        lines = [line for line in commands(target).replace("\\\n", " ").splitlines() if "cuda-requirements" in line]
        assert lines and "-r cmake/cuda-requirements.txt" in lines[0], (target, lines)


HIDE_CUTLASS = "import sys\nsys.modules['cutlass_library'] = None  # not installed\n"


def test_the_cpu_build_configures_without_cutlass(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HIDE_CUTLASS)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    probe = subprocess.run([sys.executable, "-c", "import cutlass_library"], env=env, capture_output=True)
    assert probe.returncode != 0, "CUTLASS is still importable"
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), "-GNinja",
                             f"-DPython_EXECUTABLE={sys.executable}", "-DMOEDIFFUSEQ_CUDA=OFF"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "CUTLASS" not in result.stdout + result.stderr


def _stripped_environment(tmp_path, hide: tuple[str, ...], old_setuptools: bool = False) -> dict:
    """A virtual environment that sees this Python's packages less those named in ``hide`` (by
    the start of their folder names), and a PATH that has cmake and ninja unless hidden too; with
    ``old_setuptools`` the installed setuptools' metadata says 70.0.0. Returns the python and env."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    seen = tmp_path / "site"
    seen.mkdir()
    hide = hide + (("setuptools-",) if old_setuptools else ())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.suffix != ".pth" and not entry.name.lower().startswith(hide):
            (seen / entry.name).symlink_to(entry)
    if old_setuptools:
        (seen / "setuptools-70.0.0.dist-info").mkdir()
        (seen / "setuptools-70.0.0.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: setuptools\nVersion: 70.0.0\n")
    (next((venv / "lib").glob("python3*")) / "site-packages" / "seen.pth").write_text(f"{seen}\n")
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("cmake", "ninja"):
        found = shutil.which(tool, path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if tool not in hide and found:
            (tools / tool).symlink_to(found)
    return {"python": str(venv / "bin" / "python"),
            "env": {"PATH": f"{venv / 'bin'}:{tools}", "HOME": str(tmp_path), "MOEDIFFUSEQ_CUDA": "OFF"}}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    return _source_tree_copy(tmp_path_factory.mktemp("tree") / "src")


@pytest.mark.parametrize("hide,old_setuptools,expected", [
    (("cmake", "ninja"), False, ['cmake>=3.25 (not found)', 'ninja (not found)', '"cmake>=3.25" ninja']),
    (("pybind11",), False, ['pybind11>=2.12 (not found)', 'pip install "pybind11>=2.12"']),
    ((), True, ['setuptools>=77 (found 70.0.0)', 'pip install "setuptools>=77"']),
    (("torch",), False, ["torch is not importable in this build environment", "pip install torch"]),
], ids=["cmake-ninja", "pybind11", "old-setuptools", "torch"])
def test_a_missing_build_tool_is_named_with_its_pip_command(tmp_path, source_copy, hide, old_setuptools, expected):
    """Without build isolation and with a tool missing, the backend stops before CMake (and
    before setuptools reads pyproject.toml) with a short message and the command that fixes it."""
    stripped = _stripped_environment(tmp_path, hide, old_setuptools)
    result = subprocess.run([stripped["python"], "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "--wheel-dir", str(tmp_path / "dist"), str(source_copy)], env=stripped["env"],
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for part in expected:
        assert part in output, output[-3000:]
    if hide != ("torch",):
        assert f"{stripped['python']} -m pip install" in output
        assert re.search(r"\[2 lines of output\]", output), output[-3000:]
    assert "CMake" not in output and "Traceback" not in output and "project.license" not in output


def test_setup_py_checks_the_tools_before_cmake(tmp_path, source_copy):
    stripped = _stripped_environment(tmp_path, ("pybind11",))
    result = subprocess.run([stripped["python"], str(source_copy / "setup.py"), "build_ext"], cwd=source_copy,
                            env=stripped["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-2:] == [
        "moediffuseq: the build needs pybind11>=2.12 (not found); install with:",
        f'    {stripped["python"]} -m pip install "pybind11>=2.12"'], result.stderr[-3000:]
    assert "CMake" not in result.stdout + result.stderr


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


@pytest.mark.parametrize("isa,flags,lacking", [
    ("avx512_bf16", "avx2 fma f16c avx512f avx512bw avx512vl avx512dq", "avx512_bf16"),
    ("avx512", "avx2 fma f16c", "avx512f, avx512bw, avx512vl, avx512dq"),
    ("avx2", "sse4_2 avx", "avx2, fma, f16c"),
    ("avx2", "avx2 fma f16c", None),
    ("default", "sse2", None),
])
def test_a_build_for_another_cpu_gets_one_clear_message(isa, flags, lacking):
    """A wheel built for AVX-512 would stop at its first op with an illegal instruction on a
    CPU without it; the import says so first."""
    from moediffuseq.build_info import cpu_flags, cpu_mismatch

    built = {"torch": torch.__version__, "torch_cuda": "", "cuda_kernels": False, "cpu_isa": isa}
    message = cpu_mismatch(built, frozenset(flags.split()))
    if lacking is None:
        assert message is None
    else:
        assert f"built for {isa}, which this CPU lacks ({lacking})" in message and "MOEDIFFUSEQ_CPU_ISA" in message
    assert cpu_mismatch(built, None) is None and cpu_mismatch({"torch": "2.13.0"}, frozenset()) is None
    assert cpu_mismatch({**built, "cpu_isa": moediffuseq.build_info().cpu_isa}, cpu_flags()) is None


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
    assert not re.search(r"pip install[^\n]*\btorch\b", empty), empty  # (tmp_path's name holds "_torch_")
    assert 'TORCH_SPEC="" bash cmake/install_check.sh' in empty
