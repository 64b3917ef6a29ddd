"""A CUDA toolkit directory for building against a pip CUDA build of torch with a local nvcc.

A local nvcc install may lack the library headers that torch's CUDA headers include (cuBLAS,
cuSPARSE, cuRAND, ...), while the CUDA torch wheel ships them in its nvidia-* packages
(site-packages/nvidia/cu13/{include,lib}) without nvcc. This script merges the two into one
directory of symbolic links, given to CMake as CUDA_HOME / CUDACXX:

    <out>/bin, nvvm, ...   -> the local toolkit's (nvcc finds its own files relative to <out>/bin)
    <out>/include/         every entry of the local toolkit's include/, then the wheels' others
    <out>/lib/             the same for lib/, plus unversioned links (libcublas.so -> .so.13)
    <out>/lib64, <out>/targets/<arch>/{include,lib} -> the merged include/ and lib/

Run it with the Python of the CUDA torch (its nvidia packages are found through that Python):

    /path/to/cuda-torch/python cmake/cuda_toolkit_from_wheels.py --cuda /usr/local/cuda-13.0 --out build/cuda-toolkit

It only makes links (nothing is copied or downloaded) and prints <out>. Re-running replaces <out>.
"""
import argparse
import os
import re
import shutil
import sys
from pathlib import Path


def wheel_roots() -> list[Path]:
    """The nvidia/cuNN directories (include/ and lib/) of the running Python's site-packages."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    roots = []
    for base in map(Path, nvidia.__path__):
        roots += sorted(p for p in base.glob("cu[0-9]*") if (p / "include").is_dir() or (p / "lib").is_dir())
    return roots


def link_entries(sources: list[Path], dest: Path) -> None:
    """dest/<name> -> the first source directory's <name>, for every entry of every source."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not src.is_dir():
            continue
        for entry in sorted(src.iterdir()):
            target = dest / entry.name
            if not target.exists() and not target.is_symlink():
                target.symlink_to(entry.resolve())


def add_unversioned_links(lib: Path) -> None:
    """libfoo.so -> libfoo.so.N where only versioned names exist (the linker asks for libfoo.so)."""
    for entry in sorted(lib.iterdir()):
        m = re.fullmatch(r"(lib[^/]+?\.so)\.\d+", entry.name)
        if m and not (lib / m.group(1)).exists():
            (lib / m.group(1)).symlink_to(entry.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", required=True, type=Path, help="local toolkit root (has bin/nvcc)")
    parser.add_argument("--out", required=True, type=Path, help="directory to create (replaced)")
    args = parser.parse_args()
    cuda = args.cuda.resolve()
    if not (cuda / "bin" / "nvcc").exists():
        parser.error(f"no bin/nvcc under {cuda}")
    roots = wheel_roots()
    if not roots:
        parser.error(f"no nvidia/cuNN wheel directories in the site-packages of {sys.executable}")

    out = args.out.absolute()
    if out.exists() or out.is_symlink():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in sorted(cuda.iterdir()):
        if entry.name not in ("include", "lib", "lib64", "targets"):
            (out / entry.name).symlink_to(entry.resolve())
    link_entries([cuda / "include"] + [r / "include" for r in roots], out / "include")
    lib_dir = cuda / "lib64" if (cuda / "lib64").is_dir() else cuda / "lib"
    link_entries([lib_dir] + [r / "lib" for r in roots], out / "lib")
    add_unversioned_links(out / "lib")
    (out / "lib64").symlink_to("lib")
    # nvcc.profile reads $(TOP)/targets/<arch>/{include,lib}: the same merged directories.
    for target in sorted((cuda / "targets").glob("*")) if (cuda / "targets").is_dir() else []:
        target_dir = out / "targets" / target.name
        target_dir.mkdir(parents=True)
        for name in ("include", "lib"):
            (target_dir / name).symlink_to(os.path.relpath(out / name, target_dir))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
