"""The bodies of the GPU check's environment, build and archs stages, and the fake job of its
dry run, run as child processes (``python -m bench.gpu_check env|build|archs|fake``)."""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from bench.gpu_check_jobs import ROOT
from bench.gpu_check_wheels import WHEELS, check_wheel_dir
from bench.gpu_check_stages import CUDA_ARCH_LIST, CUDA_ARCHS

# What the compiled extension depends on.
BUILD_PATHS = ("csrc", "cmake", "CMakeLists.txt", "setup.py", "pyproject.toml")
SOURCE_SUFFIXES = frozenset({".py", ".cpp", ".cc", ".c", ".cu", ".cuh", ".h", ".hpp", ".cmake", ".toml", ".in"})
FAKE_MODES = ("ok", "fail", "crash", "hang", "hang-noterm")


def tree_hash(paths: Sequence[str], extra: Sequence[str] = (), root: Path = ROOT) -> str:
    """sha256 over the relative paths and contents of the source files under ``paths``."""
    digest = hashlib.sha256()
    for name in paths:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if path.suffix not in SOURCE_SUFFIXES and path.name != "CMakeLists.txt":
                continue
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()


def sh(argv: Sequence[str], timeout: float = 30) -> None:
    """Runs a probe command, printing its output, or why it could not run."""
    print("$ " + " ".join(argv), flush=True)
    if shutil.which(argv[0]) is None:
        print(f"  {argv[0]}: not found", flush=True)
        return
    try:
        proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        print("\n".join("  " + line for line in proc.stdout.strip().splitlines()[-15:]), flush=True)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s", flush=True)


ENV_CHECK = r"""
import importlib, sys
failed = []
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", torch.cuda.get_device_capability(), "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30))
else:
    failed.append("torch.cuda")
for name, need in [("cutlass_library", True), ("pybind11", True)] + [(m, False) for m in sys.argv[1:]]:
    try:
        module = importlib.import_module(name)
        print(f"{name:16s} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as error:
        print(f"{name:16s} MISSING ({type(error).__name__}: {error})" + ("" if need else " (some stages need it)"))
        if need:
            failed.append(name)
if failed:
    sys.exit("environment: missing " + ", ".join(failed))
"""


def cmd_env(_: argparse.Namespace) -> int:
    """Machine and toolchain facts, the carried wheels installed into SITE_DIR, imports checked."""
    print(f"host {os.uname().nodename}, {os.cpu_count()} CPUs, python {sys.version.split()[0]} ({sys.executable})")
    sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"])
    sh(["nvcc", "--version"])
    sh(["cmake", "--version"])
    sh(["ninja", "--version"])
    for tool in ("cuobjdump", "compute-sanitizer", "ncu"):
        print(f"{tool}: {shutil.which(tool) or 'not found'}")
    wheel_dir, site = Path(os.environ.get("WHEEL_DIR", ".whl")), os.environ["SITE_DIR"]
    wheels = sorted(str(p) for p in wheel_dir.glob("*.whl"))
    for problem in check_wheel_dir(wheel_dir):  # against bench/gpu_check_wheels.py's pins
        print(f"carried wheels: {problem} in {wheel_dir} (fetch them with `make gpu-wheels` on a machine with network)")
    if wheels:
        print(f"installing {len(wheels)} carried wheel(s) into {site}: {', '.join(Path(w).name for w in wheels)}")
        rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--upgrade", "--target", site, *wheels]).returncode
        if rc != 0:  # e.g. a binary wheel for another Python: install the others one by one
            print(f"pip install of the carried wheels failed (rc {rc}); installing them one at a time")
            for wheel in wheels:
                one = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                      "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, wheel])
                if one.returncode != 0:
                    print(f"  not installed: {Path(wheel).name}")
    else:
        print(f"no wheels in {wheel_dir}: using the packages already installed")
    carried = [module for _, _, module in WHEELS if module and module != "cutlass_library"]
    return subprocess.run([sys.executable, "-c", ENV_CHECK, *carried]).returncode


def find_extension() -> Optional[Path]:
    found = sorted(ROOT.glob("moediffuseq/_C*.so"))
    return found[0] if found else None


BUILD_INFO_CHECK = ("import sys, moediffuseq; info = moediffuseq.build_info(); print(info); "
                    "sys.exit(0 if info.has_cuda else 'the extension was built without its CUDA kernels')")


def cmd_build(args: argparse.Namespace) -> int:
    """Builds the extension in place (CUDA on, sm_90a only, every core) unless it is up to date."""
    import torch  # noqa: PLC0415 (the machine's CUDA torch: part of what the build depends on)

    work = Path(os.environ["GPU_CHECK_WORK_DIR"])
    settings = [f"TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST}", "MOEDIFFUSEQ_CUDA=ON", f"torch {torch.__version__}",
                f"python {sys.version}"]
    digest = tree_hash(BUILD_PATHS, settings)
    stamp = work / "build.sha256"
    so = find_extension()
    if so is not None and not args.force and stamp.exists() and stamp.read_text().strip() == digest:
        print(f"{so.name} is up to date with the sources (sha256 {digest[:12]}): not rebuilt")
    else:
        stamp.unlink(missing_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": CUDA_ARCH_LIST, "MOEDIFFUSEQ_CUDA": "ON", "MAX_JOBS": jobs}
        argv = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", str(work / "cmake")]
        print(f"building with {jobs} jobs: MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST} "
              + " ".join(argv[1:]), flush=True)
        start = time.monotonic()
        rc = subprocess.run(argv, cwd=ROOT, env=env).returncode
        print(f"build finished with rc {rc} in {time.monotonic() - start:.0f} s", flush=True)
        if rc != 0:
            return rc
        stamp.write_text(digest + "\n")
    return subprocess.run([sys.executable, "-c", BUILD_INFO_CHECK], cwd=ROOT).returncode


def cmd_archs(_: argparse.Namespace) -> int:
    """cmake/check_cuda_archs.py on the built extension: sm_90a code and nothing else."""
    so, checker = find_extension(), ROOT / "cmake" / "check_cuda_archs.py"
    if so is None:
        print("no moediffuseq/_C*.so: nothing to check")
        return 1
    if not checker.exists():
        print(f"{checker.relative_to(ROOT)} is missing: the architectures of {so.name} were not checked")
        return 1
    argv = [sys.executable, str(checker), "--so", str(so), "--archs", CUDA_ARCHS]
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(argv, cwd=ROOT).returncode


def cmd_fake(args: argparse.Namespace) -> int:
    """A stand-in for a stage's job in a dry run."""
    print(f"fake {args.mode}: stage {args.stage}, job {args.label}, pid {os.getpid()}", flush=True)
    if args.mode == "ok":
        tables = Path(args.tables)
        tables.mkdir(parents=True, exist_ok=True)
        (tables / f"fake_{args.stage}_{args.label}.md").write_text(
            f"| stage | job |\n| --- | --- |\n| {args.stage} | {args.label} |\n", encoding="utf-8")
        print("done", flush=True)
        return 0
    if args.mode == "fail":
        print("failing on purpose", flush=True)
        return 1
    if args.mode == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if args.mode == "hang-noterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(60)
