"""bench/gpu_check.py (python -m bench.gpu_check), the GPU check runner, in its dry run on the
CPU: stage commands faked (ok, fail, crash, hang), a tiny deadline. Checks the deadline
arithmetic, stage selection, resumption across calls, the summary written in every case, and the
results directory's shape (at most 8 files, no deeper than two folders)."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from utils import ROOT

sys.path.append(str(ROOT))  # the bench package, found last: an installed moediffuseq still wins
from bench import gpu_check  # noqa: E402

STAGES = [stage.name for stage in gpu_check.stages("python3", Path("tables"))]


RUNNER_VARIABLES = ("STAGES", "FORCE", "DEADLINE", "OUT", "RESULTS_DIR", "GPU_CHECK_WORK_DIR", "GPU_CHECK_FAKE",
                    "GPU_CHECK_LIMITS", "GPU_CHECK_KILL_GRACE", "GPU_CHECK_CODE_HASH")


def runner_env(tmp_path, env=None):
    """The environment of one runner call: results and work directories under ``tmp_path``, a
    dry run with every stage ok and a 120 s deadline unless ``env`` says otherwise."""
    base = {k: v for k, v in os.environ.items() if k not in RUNNER_VARIABLES}
    return {**base, "RESULTS_DIR": str(tmp_path / "out"), "GPU_CHECK_WORK_DIR": str(tmp_path / "work"),
            "GPU_CHECK_CODE_HASH": "code-v1", "GPU_CHECK_FAKE": "1", "DEADLINE": "120", **(env or {})}


def run(tmp_path, env=None):
    """One runner call, to its end."""
    return subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=runner_env(tmp_path, env),
                          capture_output=True, text=True, timeout=60)


def stage_rows(tmp_path):
    """stage -> (status, seconds, budget, note) from summary.md."""
    text = (tmp_path / "out" / "summary.md").read_text()
    rows = {}
    for line in text.split("## Stages", 1)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = tuple(cells[1:])
    return rows


def check_results_dir(tmp_path):
    """At most 8 files, none deeper than two folders, and the archive readable."""
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert {p.name for p in files} <= set(gpu_check.RESULT_FILES), files
    with tarfile.open(out / gpu_check.ARCHIVE_NAME) as tar:
        return tar.getnames()


def test_budget_is_the_smaller_of_limit_and_time_left_less_the_margin():
    assert gpu_check.stage_budget(100, 500) == 100
    assert gpu_check.stage_budget(100, 80) == 50
    assert gpu_check.stage_budget(100, 20) == -10


def test_all_stages_ok_and_the_outputs(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = stage_rows(tmp_path)
    assert [rows[name][0] for name in STAGES] == ["ok"] * len(STAGES)
    names = check_results_dir(tmp_path)
    assert "tables/fake_smoke_smoke.md" in names and "state.json" in names and "history.log" in names
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "[smoke] fake ok" in log and "=== end_to_end: ok" in log
    assert "## Stages" in proc.stdout  # the summary is printed last


def test_a_hanging_stage_is_killed_when_time_before_the_margin_runs_out(tmp_path):
    start = time.monotonic()
    proc = run(tmp_path, env={"DEADLINE": "32.5", "GPU_CHECK_FAKE": "smoke=hang"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    rows = stage_rows(tmp_path)
    status, seconds, budget, note = rows["smoke"]
    assert status == "TIMEOUT" and "killed at" in note
    assert 0.5 <= float(budget) <= 2.5  # 32.5 s - (the stages before) - 30 s margin
    assert float(seconds) == pytest.approx(float(budget), abs=1.0)
    for name in STAGES[STAGES.index("smoke") + 1:]:
        assert rows[name][0] == "skipped" and "no time" in rows[name][3]
    assert elapsed < 15
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "- cut short or not run: smoke, tests, bench_attention" in summary
    check_results_dir(tmp_path)


def test_a_hanging_stage_is_killed_at_its_own_limit_even_when_it_ignores_sigterm(tmp_path):
    proc = run(tmp_path, env={"GPU_CHECK_FAKE": "tests=hang-noterm", "GPU_CHECK_LIMITS": "tests=1",
                              "GPU_CHECK_KILL_GRACE": "0.5", "STAGES": "build,tests,bench_moe"})
    assert proc.returncode == 1
    rows = stage_rows(tmp_path)
    status, seconds, budget, _ = rows["tests"]
    assert status == "TIMEOUT" and float(budget) == 1
    assert float(seconds) < 4
    assert rows["bench_moe"][0] == "ok"  # the run goes on after a killed stage
    assert rows["smoke"][0] == "not selected"


def test_stage_selection_and_resumption(tmp_path):
    # first call: only some stages, one of them fails
    proc = run(tmp_path, env={"STAGES": "build,smoke,tests", "GPU_CHECK_FAKE": "smoke=fail,tests=crash"})
    assert proc.returncode == 1
    rows = stage_rows(tmp_path)
    assert rows["environment"][0] == "ok"  # runs in every call
    assert rows["build"][0] == "ok" and rows["smoke"][0] == "FAIL"
    assert rows["tests"][0] == "FAIL" and "signal SIGSEGV" in rows["tests"][3]
    assert all(rows[name][0] == "not selected" for name in ("archs", "bench_moe", "end_to_end"))
    state = json.loads((tmp_path / "work" / "state.json").read_text())["stages"]
    assert state["build"]["status"] == "ok" and state["smoke"]["status"] == "FAIL"

    # second call: resumes, skipping what ended ok
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stdout
    rows = stage_rows(tmp_path)
    assert rows["build"][0] == "ok (earlier call)"
    assert rows["environment"][0] == "ok" and rows["smoke"][0] == "ok" and rows["end_to_end"][0] == "ok"
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "[build] fake" not in log and "[smoke] fake ok" in log

    # third call: a stage named in STAGES reruns although it ended ok; a failing dependency skips
    proc = run(tmp_path, env={"STAGES": "build,smoke", "GPU_CHECK_FAKE": "build=fail"})
    rows = stage_rows(tmp_path)
    assert rows["build"][0] == "FAIL" and rows["smoke"][0] == "skipped" and "needs build" in rows["smoke"][3]

    # fourth call: changed code under test drops the earlier results
    proc = run(tmp_path, env={"STAGES": "archs", "GPU_CHECK_CODE_HASH": "code-v2"})
    rows = stage_rows(tmp_path)
    assert rows["archs"][0] == "skipped" and "needs build" in rows["archs"][3]
    assert "tables/fake_smoke_smoke.md" not in check_results_dir(tmp_path)  # the old code's tables are gone
    check_results_dir(tmp_path)


def test_the_summary_is_written_when_the_runner_is_stopped(tmp_path):
    env = runner_env(tmp_path, {"GPU_CHECK_FAKE": "smoke=hang", "DEADLINE": "45"})
    runner = subprocess.Popen([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    hang_pid = None
    for line in runner.stdout:
        if "[smoke] fake hang" in line:
            hang_pid = int(line.rsplit("pid", 1)[1])
            break
    assert hang_pid is not None
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| smoke | running |" in summary  # written when the stage started
    runner.send_signal(signal.SIGTERM)
    rest = runner.communicate(timeout=30)[0]
    assert runner.returncode == 128 + signal.SIGTERM
    rows = stage_rows(tmp_path)
    assert rows["smoke"][0] == "killed" and rows["tests"][0] == "not reached"
    assert "stopped by SIGTERM" in (tmp_path / "out" / "summary.md").read_text()
    assert "## Stages" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(hang_pid, 0)
    check_results_dir(tmp_path)


def test_moe_bench_tells_the_cutlass_grouped_gemm_from_cublas_kernels():
    """bench/moe.py's check on CUDA (bench/moe_profile.py): only CUTLASS grouped GEMM kernels count
    as the expert GEMMs; cuBLAS kernels, CUTLASS kernels shipped in cuBLAS among them, count as a
    fallback."""
    from bench import moe_profile

    ours = ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<"
            "cute::tuple<int, int, int> >, cutlass::gemm::collective::CollectiveMma<cutlass::gemm::"
            "MainloopSm90ArrayTmaGmmaWarpSpecializedCooperative<7>, void>, void> >(cutlass::gemm::kernel::"
            "GemmUniversal<>::Params)")
    mangled = "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS1_17GroupProblemShapeIN4cute5tupleIJiiiEEEEE"
    cublas = [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
        "__5x_cublas",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT",
        "cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32_bf16_bf16_128x128x64_1x1x1_0_tnn_align8_warpspecialized",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(Params)",
        "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn",
        "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>()",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, float>()",
    ]
    others = ["void moediffuseq::cuda::(anonymous namespace)::gather_kernel<__nv_bfloat16, 8>(MoeGatherParams)",
              "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >()",
              "Memcpy DtoH (Device -> Pinned)"]
    assert moe_profile.is_cutlass_grouped_gemm(ours) and moe_profile.is_cutlass_grouped_gemm(mangled)
    assert not moe_profile.is_library_gemm(ours) and not moe_profile.is_library_gemm(mangled)
    assert all(moe_profile.is_library_gemm(name) and not moe_profile.is_cutlass_grouped_gemm(name) for name in cublas)
    assert not any(moe_profile.is_library_gemm(name) or moe_profile.is_cutlass_grouped_gemm(name) for name in others)
    profile = moe_profile.KernelProfile(inside=5, grouped={"moediffuseq::moe_ffn": 4}, library={cublas[0]})
    problems = profile.problems("fwd+bwd")
    assert len(problems) == 2 and "moe_ffn_backward" in problems[0] and "cuBLAS" in problems[1]
    assert moe_profile.KernelProfile(inside=4, grouped={"moediffuseq::moe_ffn": 4}).problems("fwd") == []
    assert "no kernel" in moe_profile.KernelProfile().problems("fwd")[0]


# The budget and the contents of one call ------------------------------------------------------------
from bench import gpu_check_stages, gpu_check_wheels  # noqa: E402


def test_the_stage_limits_add_up_to_the_deadline_less_the_margin():
    """One call of at most 9 minutes on a fresh machine: if every stage before a stage uses its
    whole limit, that stage still gets its own whole limit, the last one included."""
    stages = gpu_check.stages("python3", Path("tables"))
    assert gpu_check.DEFAULT_DEADLINE_S == gpu_check_stages.DEADLINE_S == 540
    assert [s.name for s in stages] == list(gpu_check_stages.LIMITS_S)
    assert all(s.limit_s == gpu_check_stages.LIMITS_S[s.name] for s in stages)
    total = sum(s.limit_s for s in stages)
    assert total + gpu_check_stages.MARGIN_S <= gpu_check_stages.DEADLINE_S, (total, gpu_check_stages.MARGIN_S)
    left = gpu_check_stages.DEADLINE_S
    for stage in stages:  # the runner's own arithmetic, stage by stage
        assert gpu_check.stage_budget(stage.limit_s, left) == stage.limit_s, stage.name
        left -= stage.limit_s
    # what must come back first comes first
    order = [s.name for s in stages]
    assert order[:5] == ["environment", "build", "archs", "smoke", "tests"]
    assert set(order[5:]) == {"bench_attention", "bench_moe", "bench_diffusion", "end_to_end", "sanitizer"}


def test_a_call_asks_for_every_headline_row_and_the_sanitizer():
    stages = {s.name: s for s in gpu_check.stages("python3", Path("tables"))}

    def argv(name, label=None):
        jobs = stages[name].jobs
        return " ".join(next(j for j in jobs if label in (None, j.label)).argv)

    assert "--lengths 8192 32768" in argv("bench_attention")
    assert "--ops denoise_step" in argv("bench_diffusion")
    assert "--quality-steps 0" in argv("end_to_end") and "--lengths 1024" in argv("end_to_end")
    assert "bench.moe" in argv("bench_moe")
    assert "--tool memcheck" in argv("sanitizer", "memcheck") and "--tool racecheck" in argv("sanitizer", "racecheck")
    assert all("bench.gpu_sanitize_case" in " ".join(j.argv) for j in stages["sanitizer"].jobs)
    tests = " ".join(" ".join(j.argv) for j in stages["tests"].jobs)
    for name in ("test_kernels_exact_inputs.py", "test_block_sparse_attention_lse_round_trip.py",
                 "test_block_sparse_attention.py", "test_moe_ffn.py", "test_cuda_streams.py"):
        assert f"tests/{name}" in tests
    for f in gpu_check_stages.CUDA_TEST_FILES + tuple(gpu_check_stages.WHOLE_TEST_FILES):
        assert (ROOT / "tests" / f).is_file(), f


def test_the_carried_wheels_cover_what_the_check_imports():
    """Every third-party module the check's code imports is carried, on the GPU machine, or named as
    never run; every carried module is imported or has a named importer."""
    entry = gpu_check_wheels.ENTRY_FILES + tuple(
        f"tests/{f}" for f in gpu_check_stages.CUDA_TEST_FILES + tuple(gpu_check_stages.WHOLE_TEST_FILES))
    found = gpu_check_wheels.imports_of_the_check(entry)
    carried = {module for _, _, module in gpu_check_wheels.WHEELS if module}
    known = carried | gpu_check_wheels.MACHINE | set(gpu_check_wheels.NOT_RUN)
    assert found - known == set(), f"imported by the check but neither carried, on the machine nor NOT_RUN: {found - known}"
    assert carried - found <= set(gpu_check_wheels.INDIRECT), carried - found - set(gpu_check_wheels.INDIRECT)
    assert {"cutlass_library", "expecttest", "hypothesis", "nltk", "pytest"} <= carried
    assert len({gpu_check_wheels.normalize(d) for d, _, _ in gpu_check_wheels.WHEELS}) == len(gpu_check_wheels.WHEELS)


def test_the_carried_wheels_bring_their_own_requirements():
    """pip installs them with --no-deps: each carried wheel's requirements (Linux, CPython 3.12, no
    extras; read from the installed metadata here) are carried, on the machine, or named."""
    import importlib.metadata

    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    carried = {gpu_check_wheels.normalize(d) for d, _, _ in gpu_check_wheels.WHEELS}
    allowed = carried | {gpu_check_wheels.normalize(d) for d in gpu_check_wheels.MACHINE_DISTS} | {
        gpu_check_wheels.normalize(d) for d in gpu_check_wheels.DEPS_NOT_CARRIED}
    checked = 0
    for dist, version, _ in gpu_check_wheels.WHEELS:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        checked += 1
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                assert gpu_check_wheels.normalize(req.name) in allowed, f"{dist} needs {req.name}, not carried"
    assert checked >= len(gpu_check_wheels.WHEELS) // 2  # most are installed here (the test extras)


def test_the_wheel_folder_check(tmp_path):
    for dist, version, _ in gpu_check_wheels.WHEELS:
        (tmp_path / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(b"")
    assert gpu_check_wheels.check_wheel_dir(tmp_path) == []
    (tmp_path / "nltk-3.10.4-py3-none-any.whl").unlink()
    (tmp_path / "rich-13.0.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "pytest-8.0.0-py3-none-any.whl").write_bytes(b"")
    problems = gpu_check_wheels.check_wheel_dir(tmp_path)
    assert "missing nltk==3.10.4" in problems and "unexpected rich 13.0.0" in problems
    assert any(p.startswith("pytest: wanted 9.2.0") for p in problems)
    assert subprocess.run([sys.executable, "-m", "bench.gpu_check_wheels", "verify", str(tmp_path)], cwd=ROOT,
                          capture_output=True).returncode == 1


def test_the_fetched_wheel_folder_matches_the_pins():
    """The .whl/ of this checkout (after `make gpu-wheels`) holds exactly the pinned wheels, for
    CPython 3.12 on manylinux x86_64."""
    folder = ROOT / ".whl"
    if not folder.is_dir():
        pytest.skip(".whl/ not fetched here (make gpu-wheels)")
    assert gpu_check_wheels.check_wheel_dir(folder) == []
    for wheel in folder.glob("*.whl"):
        python_tag, abi, platform = wheel.stem.split("-")[-3:]
        assert python_tag.startswith(("py3", "py2.py3", "cp312")) or abi == "abi3", wheel.name
        assert platform == "any" or "x86_64" in platform and "linux" in platform, wheel.name


def test_the_readme_gives_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make gpu-wheels" in text and "bash bench/gpu_check.sh" in text
