"""benchmarks/bias_experiment.py end to end on a toy budget, for both data sets (real runs: docs/evidence.md)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dataset", ["shapes", "digits"])
def test_experiment_runs_end_to_end_and_resumes(tmp_path, dataset):
    if dataset == "digits" and importlib.util.find_spec("sklearn") is None:
        pytest.skip("the digits data set needs scikit-learn")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bias_experiment.py"), "--dataset", dataset]
    cmd += ["--depths", "1", "2", "--seeds", "0", "--steps", "2", "--gate-every", "2", "--gate-samples", "8"]
    cmd += ["--batch", "8", "--train-size", "256", "--samples", "24", "--sample-steps", "3", "--quick", "--no-ship"]
    cmd += ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    stem = f"bias_experiment_{dataset}"
    assert sorted(os.listdir(tmp_path / "results")) == [f"{stem}.{e}" for e in ("csv", "md", "png")]
    lines = (tmp_path / "results" / f"{stem}.csv").read_text().splitlines()
    assert lines[0].startswith("dataset,depth,seed,setting,")
    assert len(lines) == 1 + 2 * 1 * 2  # header + 2 depths x 1 seed x (off, one bypass setting)
    assert ("Confusion matrix" in (tmp_path / "results" / f"{stem}.md").read_text()) == (dataset == "digits")
    # Resumable: a second run finds the finished models and their samples, and trains and samples nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"{dataset} depth" not in again.stderr
    assert len(list((tmp_path / "runs" / dataset / "depth1-seed0").glob("samples-*.pt"))) == 2
