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


def _tiny_unet2d_folder(tmp_path):
    from bypass_kernels.presets import build_unet

    folder = tmp_path / "model"
    build_unet("tiny-unet2d").save_pretrained(folder)
    return folder


def test_generate_with_a_local_model_folder(tmp_path, capsys):
    folder = _tiny_unet2d_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folder), "--out", str(out), "--n", "6", "--steps", "2"]) == 0
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "blue_circle" in text and "invalid" in text


def test_generate_refuses_a_conditional_unet(tmp_path, capsys):
    from bypass_kernels.presets import build_unet

    build_unet("tiny-sd").save_pretrained(tmp_path / "cond")
    assert main(["generate", "--model", str(tmp_path / "cond"), "--out", str(tmp_path)]) == 2
    assert "UNet2DModel" in capsys.readouterr().err


def test_generate_default_runs_the_shipped_trained_model(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path), "--n", "48", "--steps", "20"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    valid_without = sum(int(rows[g][0]) for g in ("red_square", "blue_square", "red_circle", "blue_circle"))
    assert valid_without >= 24  # a trained model draws mostly valid shapes; random weights draw none
