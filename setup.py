"""Builds moediffuseq._C with CMake + Ninja; all build logic lives in CMakeLists.txt and cmake/.

Install against an already installed torch:  pip install --no-build-isolation .
Environment: MOEDIFFUSEQ_CUDA=AUTO|ON|OFF, MOEDIFFUSEQ_CPU_ISA=auto|avx512|avx2|default,
MOEDIFFUSEQ_CUDA_ARCHS or TORCH_CUDA_ARCH_LIST (the CUDA architectures, default 9.0a; see
cmake/cuda_archs.cmake), MAX_JOBS (parallel compile jobs).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMOEDIFFUSEQ_CUDA={os.environ.get('MOEDIFFUSEQ_CUDA', 'AUTO')}",
            f"-DMOEDIFFUSEQ_CPU_ISA={os.environ.get('MOEDIFFUSEQ_CPU_ISA', 'auto')}",
            # Empty means unset: passed on every configure so that the cache follows the environment.
            f"-DMOEDIFFUSEQ_CUDA_ARCHS={os.environ.get('MOEDIFFUSEQ_CUDA_ARCHS', '')}",
            f"-DTORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}",
        ]
        build = ["--build", str(build_dir)]
        if "MAX_JOBS" in os.environ:
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(["cmake", *config], check=True)
        subprocess.run(["cmake", *build], check=True)


setup(
    ext_modules=[CMakeExtension("moediffuseq._C")],
    cmdclass={"build_ext": CMakeBuild},
)
