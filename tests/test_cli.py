import json
import subprocess
import sys

import pytest

from bypass_kernels.cli import main


def test_run_prints_timestep_lambda_and_time(capsys):
    assert main(["run", "--steps", "4", "--schedule", "linear:0.5:400"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[1]) for r in rows] == [750, 500, 250, 0]
    expected = [max(0.0, 0.5 * (t - 400) / 599) for t in (750, 500, 250, 0)]
    assert [float(r[2]) for r in rows] == pytest.approx(expected, abs=1e-4)
    assert all(float(r[3]) > 0 for r in rows)
    assert "final latents vs the unpatched model" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["backends"]) == {"triton", "cuda", "cpu", "torch"}


def test_schedule_plot(tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["schedule", "cosine:0.4:200", "--json", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"shape": "cosine"' in capsys.readouterr().out


def test_bad_schedule_is_an_error_not_a_traceback(capsys):
    assert main(["run", "--schedule", "linear:7"]) == 2
    assert "strength" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "bypass_kernels.cli", "info"], capture_output=True, text=True, check=True
    )
    assert "torch" in out.stdout
