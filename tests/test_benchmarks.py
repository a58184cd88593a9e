"""The benchmark harness's own logic, on the CPU in seconds: intervals and the "within noise" rule,
the UNet-step rows (a variant that cannot run gets a row, the others go on), the verdict on the
committed H200 run, the pytest plugin that selects GPU tests, and gpu_check.sh's dry run."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import intervals  # noqa: E402
import verdict  # noqa: E402

H200 = os.path.join(BENCH, "results", "h200-c640135")


@pytest.fixture(autouse=True)
def _never_leave_patched():
    """Overrides conftest's: nothing here patches a UNet, so its three tiny models need not be built."""
    yield


# --- intervals -------------------------------------------------------------------------------------


def test_median_ci_uses_order_statistics_with_enough_coverage():
    assert intervals.median_ci([5, 1, 4, 2, 3]) == (3, 1, 5)  # n = 5: the range (94%)
    assert intervals.median_ci(range(1, 10)) == (5, 2, 8)  # n = 9: 2nd to 8th (96%)
    assert intervals.coverage(9, 2) >= 0.9 > intervals.coverage(9, 3)
    assert intervals.median_ci([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        intervals.median_ci([])


def test_paired_overhead_cancels_drift_between_rounds():
    ref = [10.0, 20.0, 10.0, 20.0, 10.0]  # the machine slowed down by 2x in some rounds
    slower = [x * 1.01 for x in ref]
    pct, lo, hi = intervals.paired_overhead_pct(slower, ref)
    assert pct == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert not intervals.within_noise(lo, hi)
    assert intervals.overhead_text(pct, lo, hi) == "+1.00% [+1.00, +1.00]"


def test_within_noise_when_the_interval_includes_zero():
    pct, lo, hi = intervals.paired_overhead_pct([10.1, 9.9, 10.2, 9.8, 10.0], [10.0] * 5)
    assert lo < 0 < hi
    assert intervals.overhead_text(pct, lo, hi).endswith("within noise")
    assert intervals.within_noise(0.0, 0.5) and not intervals.within_noise(0.1, 0.5)


# --- UNet-step rows ----------------------------------------------------------------------------------


class Toy(torch.nn.Module):
    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail

    def forward(self, sample, timestep, return_dict=False):
        if self.fail:
            raise RuntimeError("boom\nsecond line")
        return (sample * 2,)


def test_a_failing_variant_gets_a_row_and_the_others_go_on():
    import unet_step

    inputs = {"sample": torch.ones(2, 3), "timestep": torch.full((), 999.0)}
    models = {"unpatched": Toy(), "broken": Toy(fail=True), "unbuilt": None, "other": Toy()}
    result = unet_step.measure_mode(
        models, inputs, "eager", torch.device("cpu"), rounds=3, reps=2, loop_steps=1, errors={"unbuilt": "error: X"}
    )
    common = dict(batch=2, dtype="float32", latent="1x3", loop_steps=1, device="cpu", torch="", triton="", cuda="")
    rows = {
        r["variant"]: r for r in unet_step.rows_for(result, model="toy", mode="eager", common={**common, "date": ""})
    }
    assert rows["broken"]["status"] == "error: RuntimeError: boom" and rows["broken"]["median_ms"] == ""
    assert rows["unbuilt"]["status"] == "error: X"
    assert rows["unpatched"]["status"] == "ok" and rows["unpatched"]["overhead"] == "reference"
    other = rows["other"]
    assert other["status"] == "ok" and other["rounds"] == 3
    assert other["ms_lo"] <= other["median_ms"] <= other["ms_hi"]
    assert other["overhead_lo_pct"] <= other["overhead_pct"] <= other["overhead_hi_pct"]
    text = re.fullmatch(r"([+-]\d+\.\d\d)% \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]( within noise)?", other["overhead"])
    assert text and abs(float(text[1]) - other["overhead_pct"]) <= 0.0051
    assert other["host_syncs"] == "" and other["peak_mib"] == ""  # CUDA-only columns


def test_cuda_graph_mode_off_cuda_is_a_skipped_row_per_variant():
    import unet_step

    inputs = {"sample": torch.ones(2, 3), "timestep": torch.full((), 999.0)}
    result = unet_step.measure_mode({"unpatched": Toy(), "a": Toy()}, inputs, "cuda_graph", torch.device("cpu"))
    common = dict(batch=2, dtype="", latent="", loop_steps=1, device="", torch="", triton="", cuda="", date="")
    rows = unet_step.rows_for(result, model="toy", mode="cuda_graph", common=common)
    assert [r["status"] for r in rows] == ["skipped: CUDA graphs need a CUDA device"] * 2


def test_rows_without_a_timed_reference_say_so():
    import unet_step

    result = {
        "status": {"unpatched": "error: E", "a": "ok"},
        "samples": {"a": [1000.0, 1100.0, 900.0]},
        **{k: {} for k in ("kernels", "syncs", "peak", "loop")},
    }
    common = dict(batch=2, dtype="", latent="", loop_steps=1, device="", torch="", triton="", cuda="", date="")
    a = unet_step.rows_for(result, model="m", mode="eager", common=common)[1]
    assert (a["median_ms"], a["ms_lo"], a["ms_hi"]) == (1.0, 0.9, 1.1)
    assert a["overhead"] == "no unpatched reference" and a["overhead_pct"] == ""


# --- verdict -----------------------------------------------------------------------------------------


def h200_verdict():
    return {
        t.target: t
        for t in verdict.verdict(f"{H200}-microbench.csv", f"{H200}-unet_step.csv", f"{H200}-gpu_tests.xml", None)
    }


def test_verdict_of_the_committed_h200_run():
    got = h200_verdict()

    def find(*words):
        (match,) = [t for name, t in got.items() if all(w in name for w in words)]
        return match

    assert find("triton", "copy bandwidth").status == "PASS"
    assert find("triton", "copy bandwidth").value.startswith("min 100.1% (fp32 105.0%, fp16 102.1%, bf16 100.1%)")
    assert find("cuda", "copy bandwidth").value.startswith("min 95.5%")
    assert find("cuda", "copy bandwidth").status == "PASS"
    assert find("triton", "baseline (c)").value == "min 3.85× (fp32 3.85×, fp16 4.52×, bf16 4.91×)"
    assert find("cuda", "baseline (c)").value == "min 3.43× (fp32 3.43×, fp16 4.45×, bf16 4.38×)"
    assert find("triton", "one kernel").value == "1 kernel per call in all 24 rows"
    assert find("sd15, cuda_graph").status == "PASS" and find("sd15, cuda_graph").value.startswith("+0.026%")
    assert find("sdxl, cuda_graph").status == "PASS" and find("sdxl, cuda_graph").value.startswith("+0.053%")
    assert find("sd15, compile").status == "FAIL" and find("sd15, compile").value.startswith("+1.125%")
    assert find("sd15, reduce-overhead").status == "FAIL" and "744 vs 744" in find("sd15, reduce-overhead").value
    assert find("host sync").status == "SKIPPED"
    tests = find("GPU tests")
    assert tests.status == "FAIL" and tests.value.startswith("1 error (tests.test_export)")
    assert find("host cost").status == "SKIPPED"


def test_verdict_without_files_skips_every_target():
    targets = verdict.verdict(None, None, None, None)
    assert {t.status for t in targets} == {"SKIPPED"}
    text = verdict.markdown(targets)
    assert text.startswith("| target | measured | verdict |") and f"0 PASS, 0 FAIL, {len(targets)} SKIPPED" in text


def test_verdict_reads_new_rows_intervals_syncs_and_junit(tmp_path):
    unet = tmp_path / "unet.csv"
    head = "model,variant,mode,status,overhead_pct,overhead,kernels_per_step,host_syncs,date"
    unet.write_text(
        "\n".join(
            [
                head,
                "sd15,unpatched,eager,ok,0.0,reference,1174,0,d",
                'sd15,patched_auto,eager,ok,0.5,"+0.50% [-0.20, +1.10] within noise",1175,0,d',
                'sd15,naive_item_hook,eager,ok,3.0,"+3.00% [+2.00, +4.00]",1178,2,d',
                "sd15,unpatched,cuda_graph,ok,0.0,reference,1174,,d",
                'sd15,patched_auto,cuda_graph,ok,0.02,"+0.02% [-0.01, +0.05] within noise",1175,,d',
                "sdxl,patched_auto,cuda_graph,error: RuntimeError: x,,,,,d",
            ]
        )
        + "\n"
    )
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_compile" '
        'name="test_eager_patched_forward_has_no_host_sync" time="1"/>'
        '<testcase classname="tests.test_ops" name="test_a"><skipped message="s"/></testcase>'
        '<testcase classname="tests.test_ops" name="test_b"><failure message="f"/></testcase>'
        '<testcase time="0.000" />'  # what pytest writes for a test cut short by SIGINT
        "</testsuite></testsuites>"
    )
    got = {t.target: t for t in verdict.verdict(None, str(unet), str(junit), None)}
    graph = next(t for n, t in got.items() if "sd15, cuda_graph" in n)
    assert graph.status == "PASS" and graph.value == "+0.02% [-0.01, +0.05] within noise; kernels 1175 vs 1174"
    sdxl = next(t for n, t in got.items() if "sdxl, cuda_graph" in n)
    assert sdxl.status == "FAIL" and "RuntimeError" in sdxl.value
    sync = next(t for n, t in got.items() if "host sync" in n)
    assert sync.status == "PASS" and "sd15 patched_auto: 0" in sync.value and "naive" not in sync.value
    tests = next(t for n, t in got.items() if "GPU tests" in n)
    assert tests.status == "FAIL" and tests.value == "1 passed, 1 failed, 1 skipped (tests.test_ops::test_b)"


def test_verdict_host_cost_rows(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text(
        "call,backend,size,dtype,median_us,ratio_to_add,ratio_lo,ratio_hi,date\n"
        "add_,,sd15_mid,fp16,17.5,1.0,1.0,1.0,d\n"
        "blend_,cuda,sd15_mid,fp16,28.0,1.6,1.55,1.65,d\n"
        "blend_,cuda,tiny,fp16,27.0,1.6,1.55,1.65,d\n"
    )
    (target,) = verdict.host_cost(verdict.read(str(path)))
    assert target.status == "FAIL" and target.value == "1.60× [1.55, 1.65] (28.0 µs per call)"


# --- pytest plugin and gpu_check.sh -----------------------------------------------------------------------


GPU_TESTS = ("test_cuda_graph_replay_matches_eager_every_step", "test_eager_patched_forward_has_no_host_sync")
GPU_PARAMETRIZED = "test_backend_matches_reference"  # its cuda cases marked, its cpu cases not


def test_every_test_that_needs_a_gpu_is_selected_by_the_gpu_mark(request):
    """gpu_check.sh runs `pytest -m "gpu or tensorrt"`: a GPU test written without the mark would never run.
    Read from this run's own collection (conftest's marks applied); a run of some files only collects the
    two files that hold the tests named here."""
    items = {item.name: item for item in request.session.items}
    if not all(name in items for name in GPU_TESTS):
        cmd = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "-p", "no:xdist"]
        files = ["tests/test_compile.py", "tests/test_ops.py"]
        root = os.path.dirname(BENCH)
        marked = subprocess.run([*cmd, "-m", "gpu or tensorrt", *files], capture_output=True, text=True, cwd=root)
        for name in GPU_TESTS:
            assert name in marked.stdout, marked.stdout[-2000:]
        assert not any(GPU_PARAMETRIZED in line and "-cpu-" in line for line in marked.stdout.splitlines())
        return

    def selected(item) -> bool:
        return not {"gpu", "tensorrt"}.isdisjoint(mark.name for mark in item.iter_markers())

    assert all(selected(items[name]) for name in GPU_TESTS)
    params = [(i.callspec.params["device"], i) for i in items.values() if i.originalname == GPU_PARAMETRIZED]
    assert params and all(selected(item) == (device == "cuda") for device, item in params)


def test_gpu_check_dry_run_skips_gpu_steps_and_prints_the_verdict(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", os.path.join(BENCH, "gpu_check.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "| target | measured | verdict |" in proc.stdout
    assert "SKIPPED  GPU tests" in proc.stdout and "SKIPPED  install" in proc.stdout
    assert "- ok       environment" in proc.stdout  # a function step, run under timeout by a child bash
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "verdict.md"] and len(files) <= 8
    assert "0 PASS, 0 FAIL" in (out / "verdict.md").read_text()


def test_host_cost_rows_ratio_against_add():
    import microbench

    import bypass_kernels

    table = bypass_kernels.default_schedule().table("cpu")
    env = dict(device="cpu", torch="", triton="", cuda="", date="")
    rows = microbench.host_cost_rows(torch.device("cpu"), table, ["tiny"], ["fp32"], rounds=3, calls=5, env=env)
    by_call = {(r["call"], r["backend"]): r for r in rows}
    assert by_call[("add_", "")]["ratio_to_add"] == 1.0
    assert {("blend_", "auto"), ("blend_", "torch")} <= set(by_call)
    for r in rows:
        assert r["lo_us"] <= r["median_us"] <= r["hi_us"] and r["ratio_lo"] <= r["ratio_to_add"] <= r["ratio_hi"]


def test_gpu_check_control_flow_with_a_fake_gpu(tmp_path):
    """Every step runs in order behind a fake nvidia-smi and a fake Python that fails one step; the
    failure is recorded and the rest still run; the verdict (real Python) ends the log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'Fake GPU, 1.0, 1 MiB, 9.0'\n")
    fake_py = bin_dir / "fakepy"
    fake_py.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f'  *verdict.py*) exec {sys.executable} "$@" ;;\n'
        "  *microbench.py*) echo 'fake microbench fails'; exit 3 ;;\n"
        '  *) echo "fake: $*"; exit 0 ;;\n'
        "esac\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(fake_py)}

    def run(out, **extra):
        args = ["bash", os.path.join(BENCH, "gpu_check.sh")]
        proc = subprocess.run(args, capture_output=True, text=True, env={**env, "OUT": str(out), **extra}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = run(tmp_path / "out")
    steps = text[text.index("Steps:") :]
    assert "FAILED   microbenchmarks and blend_ host cost (exit 3" in steps
    names = ("install", "GPU tests", "torch.compile facts", "compile warm-up", "UNet step: SD1.5, CUDA graph")
    for name in (*names, "UNet step: SDXL", "Transformer step"):
        assert f"ok       {name}" in steps, name
    assert steps.index("UNet step: SD1.5 compiled") < steps.index("UNet step: SDXL")
    assert "| target | measured | verdict |" in text and "[warm-up] fake:" in text

    spent = run(tmp_path / "spent", GPU_CHECK_BUDGET_S="10")
    assert "SKIPPED  GPU tests: pytest -m 'gpu or tensorrt' (budget spent)" in spent


def test_a_variant_whose_precheck_fails_gets_a_row(monkeypatch):
    import unet_step

    def why_not(model, inputs, mode, device):
        if model.fail:
            raise RuntimeError("capture")
        return None

    monkeypatch.setattr(unet_step, "why_not", why_not)
    inputs = {"sample": torch.ones(2, 3), "timestep": torch.full((), 999.0)}
    result = unet_step.measure_mode({"unpatched": Toy(), "b": Toy(fail=True)}, inputs, "eager", torch.device("cpu"))
    assert result["status"] == {"unpatched": "ok", "b": "error: RuntimeError: capture"}


def test_per_sample_benchmark_rows(tmp_path):
    """One round of each row of benchmarks/per_sample.py on the CPU: the op with a [T] and a [8, T] table,
    the step with 8 schedules against one shared and against 8 calls; overhead against the shared one."""
    import per_sample

    out = tmp_path / "per_sample.csv"
    assert (
        per_sample.main(
            [
                "--device",
                "cpu",
                "--models",
                "tiny-flux",
                "--op-sizes",
                "sd15_mid_b8",
                "--rounds",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with open(out, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    variants = {(r["kind"], r["variant"]) for r in rows}
    assert ("op", "2-D table, a row per sample") in variants and ("step", "batch 8, 8 schedules") in variants
    step = next(r for r in rows if r["variant"] == "batch 8, 8 schedules")
    assert step["target_pct"] == "2" and float(step["median_us"]) > 0 and step["overhead_pct"] != ""
