"""Builds moediffuseq._C with CMake + Ninja; all build logic lives in CMakeLists.txt and cmake/.

Install against an already installed torch:  pip install --no-build-isolation .
The tools (cmake/build-requirements.txt, and cmake/cuda-requirements.txt for the CUDA kernels)
and torch are checked before CMake runs (cmake/moediffuseq_build.py).
Environment: MOEDIFFUSEQ_CUDA=AUTO|ON|OFF, MOEDIFFUSEQ_CPU_ISA=auto|avx512|avx2|default,
MOEDIFFUSEQ_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST (the CUDA architectures, default 9.0a; see
cmake/cuda_archs.cmake), MAX_JOBS (parallel compile jobs), CMAKE_ARGS (more -D options).
The CMake tree persists in build/cmake-<python>-torch<version>, so a rebuild (pip install -e .
again) recompiles only what changed.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "cmake"))
from moediffuseq_build import build_env, check_build_environment, check_setuptools  # noqa: E402

check_setuptools()  # an older one fails on pyproject.toml's license with a page of schema errors


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


BUILD_CONFIG = "_build_config.json"  # written by CMake beside _C: what it was built against


class CMakeBuild(build_ext):
    """build_ext driving CMake; _C's build record travels with it (wheel, in place, editable)."""

    def _build_config_paths(self) -> list[tuple[str, str]]:
        build_py = self.get_finalized_command("build_py")
        pairs = (self._get_inplace_equivalent(build_py, ext) for ext in self.extensions)
        return [(str(Path(regular).with_name(BUILD_CONFIG)), str(Path(inplace).with_name(BUILD_CONFIG)))
                for inplace, regular in pairs]

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        for regular, inplace in self._build_config_paths():
            self.copy_file(regular, inplace, level=self.verbose)

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            yield from self._build_config_paths()

    def get_outputs(self) -> list[str]:
        extra = [] if self.inplace else [regular for regular, _ in self._build_config_paths()]
        return [*super().get_outputs(), *extra]

    def build_extension(self, ext: Extension) -> None:
        torch_version = check_build_environment()  # torch and every build tool, before CMake
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = f"{sysconfig.get_config_var('SOABI') or sys.implementation.cache_tag}-torch{torch_version}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        lib_dir = build_dir / "package"  # a fixed link target: an unchanged _C is not relinked
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMOEDIFFUSEQ_CUDA={os.environ.get('MOEDIFFUSEQ_CUDA', 'AUTO')}",
            f"-DMOEDIFFUSEQ_CPU_ISA={os.environ.get('MOEDIFFUSEQ_CPU_ISA', 'auto')}",
            # Empty means unset: passed on every configure so that the cache follows the environment.
            f"-DMOEDIFFUSEQ_CUDA_ARCHS={os.environ.get('MOEDIFFUSEQ_CUDA_ARCHS', '')}",
            f"-DTORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        build = ["--build", str(build_dir)]
        if "MAX_JOBS" in os.environ:
            build += ["--parallel", os.environ["MAX_JOBS"]]
        env = build_env()  # cmake and ninja of the building Python's environment first
        subprocess.run(["cmake", *config], check=True, env=env)
        subprocess.run(["cmake", *build], check=True, env=env)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (Path(self.get_ext_fullpath(ext.name)).name, BUILD_CONFIG):
            shutil.copy2(lib_dir / name, out_dir / name)


setup(
    ext_modules=[CMakeExtension("moediffuseq._C")],
    cmdclass={"build_ext": CMakeBuild},
)
