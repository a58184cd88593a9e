"""benchmarks/bias_experiment.py end to end on a toy budget, for both data sets (real runs: docs/evidence.md).
Its ``main`` runs in this process (as ``python benchmarks/bias_experiment.py ...`` would, without a
new interpreter importing torch and diffusers for each of the four runs)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def experiment():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bias_experiment
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return bias_experiment


@pytest.mark.parametrize("dataset", ["shapes", "digits"])
def test_experiment_runs_end_to_end_and_resumes(tmp_path, dataset, experiment, capsys, one_thread):
    if dataset == "digits" and importlib.util.find_spec("sklearn") is None:
        pytest.skip("the digits data set needs scikit-learn")
    argv = ["--dataset", dataset, "--depths", "1", "2", "--seeds", "0", "--steps", "2", "--gate-every", "2"]
    argv += ["--gate-samples", "8", "--batch", "8", "--train-size", "256", "--samples", "24", "--sample-steps", "3"]
    argv += ["--quick", "--no-ship", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    argv += ["--device", "cpu"]
    experiment.main(argv)
    assert f"{dataset} depth" in capsys.readouterr().err  # trained and sampled (its progress bars)
    stem = f"bias_experiment_{dataset}"
    assert sorted(os.listdir(tmp_path / "results")) == [f"{stem}.{e}" for e in ("csv", "md", "png")]
    lines = (tmp_path / "results" / f"{stem}.csv").read_text().splitlines()
    assert lines[0].startswith("dataset,depth,seed,setting,")
    assert len(lines) == 1 + 2 * 1 * 2  # header + 2 depths x 1 seed x (off, one bypass setting)
    assert ("Confusion matrix" in (tmp_path / "results" / f"{stem}.md").read_text()) == (dataset == "digits")
    # Resumable: a second run finds the finished models and their samples, and trains and samples nothing.
    experiment.main(argv)
    assert f"{dataset} depth" not in capsys.readouterr().err
    assert len(list((tmp_path / "runs" / dataset / "depth1-seed0").glob("samples-*.pt"))) == 2
