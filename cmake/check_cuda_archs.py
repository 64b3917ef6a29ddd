"""Checks which CUDA architectures a built library holds code for.

    python cmake/check_cuda_archs.py --so moediffuseq/_C.cpython-311-x86_64-linux-gnu.so --archs 90a

Lists the SASS (cuobjdump --list-elf) and PTX (cuobjdump --list-ptx) embedded in the library,
prints them, and exits 1 when the library holds code for an architecture that was not asked for
or lacks SASS (or requested PTX) for one that was; 0 when they match; 2 on a usage error or
when cuobjdump cannot run.

--archs takes the list the build was given, in either format (cmake/cuda_archs.cmake), entries
separated by ';', ',' or spaces:
    torch  X.Y[a|f][+PTX]            9.0a  8.0;9.0a  9.0a+PTX
    CMake  XY[a|f][-real|-virtual]   90a   80;90a    90a-real
Every entry asks for its SASS, except XY-virtual (PTX only). PTX is required where an entry
asks for it alone (+PTX, -virtual) and allowed for every listed architecture, so that one
--archs value accepts a build whatever its PTX choice; SASS or PTX of an architecture that is
not listed is an error (e.g. sm_90 next to sm_90a, or compute_50).

cuobjdump is taken from --cuobjdump, $CUOBJDUMP, beside nvcc (PATH, $CUDA_HOME, $CUDA_PATH,
/usr/local/cuda), PATH, or the copy that some Python packages carry (nvidia-cuda-cuobjdump,
triton) in this interpreter's site-packages.
"""
import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TORCH_ENTRY = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")
CMAKE_ENTRY = re.compile(r"^(\d+)(\d)([af]?)(-real|-virtual)?$")


def parse_archs(text: str) -> tuple[set[str], set[str], set[str]]:
    """(SASS required, PTX required, listed) architecture names such as "90a"."""
    sass, ptx, listed = set(), set(), set()
    entries = [e for e in re.split(r"[;,\s]+", text.strip()) if e]
    if not entries:
        raise ValueError("empty architecture list")
    for entry in entries:
        if m := TORCH_ENTRY.match(entry):
            name = m.group(1) + m.group(2) + m.group(3)
            sass.add(name)
            if m.group(4):
                ptx.add(name)
        elif m := CMAKE_ENTRY.match(entry):
            name = m.group(1) + m.group(2) + m.group(3)
            if m.group(4) != "-virtual":
                sass.add(name)
            else:
                ptx.add(name)
        else:
            raise ValueError(f"'{entry}' is neither X.Y[a|f][+PTX] (e.g. 9.0a) nor XY[a|f][-real|-virtual] (e.g. 90a)")
        listed.add(name)
    return sass, ptx, listed


def find_cuobjdump(explicit: str | None) -> str | None:
    candidates = [explicit, os.environ.get("CUOBJDUMP")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [str(Path(nvcc).parent / "cuobjdump"), str(Path(nvcc).resolve().parent / "cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    candidates += ["/usr/local/cuda/bin/cuobjdump", shutil.which("cuobjdump")]
    for package, pattern in (("nvidia", "*/bin/cuobjdump"), ("triton", "backends/nvidia/bin/cuobjdump")):
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidates += sorted(str(p) for p in Path(root).glob(pattern))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def list_code(cuobjdump: str, so: Path, what: str) -> list[str]:
    """Architecture names of the ELF ("elf") or PTX ("ptx") entries, one per entry."""
    result = subprocess.run([cuobjdump, f"--list-{what}", str(so)], capture_output=True, text=True)
    text = result.stdout + result.stderr
    if result.returncode != 0 and "does not contain device code" not in text:
        raise RuntimeError(f"{cuobjdump} --list-{what} failed ({result.returncode}):\n{text}")
    suffix = "cubin" if what == "elf" else "ptx"
    return re.findall(rf"\.(?:sm|compute)_(\d+[af]?)\.{suffix}\b", result.stdout)


def summary(names: list[str], kind: str) -> str:
    if not names:
        return "none"
    prefix = "sm_" if kind == "SASS" else "compute_"
    return ", ".join(f"{prefix}{n} ({names.count(n)})" for n in sorted(set(names), key=lambda n: (len(n), n)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--so", required=True, type=Path, help="the shared library to inspect")
    parser.add_argument("--archs", required=True, help="the architectures asked for (torch or CMake format)")
    parser.add_argument("--cuobjdump", help="path of cuobjdump (default: searched)")
    args = parser.parse_args()
    try:
        want_sass, want_ptx, listed = parse_archs(args.archs)
    except ValueError as e:
        print(f"check_cuda_archs: --archs: {e}", file=sys.stderr)
        return 2
    if not args.so.is_file():
        print(f"check_cuda_archs: no such file: {args.so}", file=sys.stderr)
        return 2
    cuobjdump = find_cuobjdump(args.cuobjdump)
    if not cuobjdump:
        print("check_cuda_archs: cuobjdump not found (give --cuobjdump or CUOBJDUMP, or put nvcc's bin on PATH)",
              file=sys.stderr)
        return 2
    try:
        elf = list_code(cuobjdump, args.so, "elf")
        ptx = list_code(cuobjdump, args.so, "ptx")
    except RuntimeError as e:
        print(f"check_cuda_archs: {e}", file=sys.stderr)
        return 2

    print(f"check_cuda_archs: {args.so}")
    sass_text = ", ".join(f"sm_{a}" for a in sorted(want_sass)) or "none"
    ptx_text = ", ".join(f"compute_{a}" for a in sorted(want_ptx))
    print(f"  asked: {args.archs} -> SASS {sass_text}; PTX {ptx_text + ' required' if ptx_text else 'optional'}"
          " (of the listed archs only)")
    print(f"  found: SASS {summary(elf, 'SASS')}; PTX {summary(ptx, 'PTX')}   [{cuobjdump}]")
    problems = []
    problems += [f"SASS sm_{a} not asked for" for a in sorted(set(elf) - want_sass)]
    problems += [f"SASS sm_{a} missing" for a in sorted(want_sass - set(elf))]
    problems += [f"PTX compute_{a} not asked for" for a in sorted(set(ptx) - listed)]
    problems += [f"PTX compute_{a} missing" for a in sorted(want_ptx - set(ptx))]
    for p in problems:
        print(f"  FAIL: {p}")
    print("  OK: the library holds code for exactly the architectures asked for" if not problems else
          f"  {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
