import argparse
import json
import subprocess
import sys

import pytest
import torch

import bypass_kernels
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


def test_generate_checks_its_output_folder_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    missing_model = tmp_path / "no-model-here"
    # The folder is checked first: the error names --out, not the (also missing) model.
    assert main(["generate", "--model", str(missing_model), "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write" in err and "no-model-here" not in err


def test_generate_with_a_wrong_model_leaves_no_output_folder(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "no-model-here"), "--out", str(tmp_path / "out")]) == 2
    assert "no-model-here" in capsys.readouterr().err and not (tmp_path / "out").exists()


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


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "bypass_kernels.cli", *argv], capture_output=True, text=True)


def _assert_one_line_usage_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("bypass-kernels")
    for word in words:
        assert word in lines[0], err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "--steps", "0"], ["--steps", "positive"]),
        (["run", "--steps", "-3"], ["--steps", "-3"]),
        (["run", "--steps", "two"], ["--steps"]),
        (["run", "--batch", "0"], ["--batch"]),
        (["run", "--seed", str(2**70)], ["--seed"]),
        (["run", "--device", "bogus"], ["--device", "bogus"]),
        (["run", "--device", "meta"], ["--device", "meta"]),
        (["generate", "--steps", "0"], ["--steps", "positive"]),
        (["generate", "--n", "-1"], ["--n"]),
        (["run", "--no-such-option"], ["--no-such-option"]),
        (["schedule", "--num-train-timesteps", "1"], ["num_train_timesteps"]),
        (["schedule", '{"shape": "linear"}'], ["missing key 'strength'"]),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, words, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    _assert_one_line_usage_error(code, capsys.readouterr().err, *words)


def test_run_steps_0_in_a_subprocess_has_no_traceback():
    out = _cli("run", "--steps", "0")
    _assert_one_line_usage_error(out.returncode, out.stderr, "--steps")
    assert out.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_run_on_cuda_without_cuda_is_a_usage_error():
    out = _cli("run", "--device", "cuda", "--steps", "2")
    _assert_one_line_usage_error(out.returncode, out.stderr, "--device", "cuda", "not available")
    assert out.stdout == ""


def test_runtime_errors_are_one_line_too(capsys):
    # diffusers' own error (more steps than training timesteps) after the model has loaded
    assert main(["run", "--steps", "1001", "--no-baseline"]) == 2
    _assert_one_line_usage_error(2, capsys.readouterr().err, "1001")


def test_run_takes_a_for_scheduler_spec(capsys):
    # the run command's 4 DDIM steps visit 750, 500, 250, 0: λ by fraction of sampling, active on [0, 0.5)
    spec = "for_scheduler:DDIMScheduler:4:0.5:0:0.5"
    assert main(["run", "--steps", "4", "--no-baseline", "--schedule", spec]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[1]) for r in rows] == [750, 500, 250, 0]
    assert [float(r[2]) for r in rows] == pytest.approx([0.5, 0.25, 0.0, 0.0], abs=1e-4)
    assert "BypassSchedule.for_scheduler(<DDIMScheduler: 4 timesteps>" in out


def test_schedule_command_prints_a_for_scheduler_record(capsys, tmp_path):
    spec = "for_scheduler:EulerDiscreteScheduler:7:0.4:0:0.5:cosine"
    assert main(["schedule", spec, "--json", "--num-train-timesteps", "500"]) == 0
    record = json.loads(capsys.readouterr().out)  # --json prints the record alone
    assert record["shape"] == "for_scheduler" and record["num_train_timesteps"] == 500
    assert (
        record["scheduler"] == "EulerDiscreteScheduler" and record["ramp"] == "cosine" and len(record["timesteps"]) == 7
    )
    path = tmp_path / "s.json"
    path.write_text(json.dumps(record))
    assert main(["schedule", str(path), "--json"]) == 0  # the record, resolved timesteps and all, as a file
    assert json.loads(capsys.readouterr().out) == record
    assert main(["schedule", "for_scheduler:DDIMScheduler:0:0.4"]) == 2
    _assert_one_line_usage_error(2, capsys.readouterr().err, "num_inference_steps")


# -- help, reports and messages for people (CLI review) --------------------------------------------


def _subparsers():
    from bypass_kernels.cli import build_parser

    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


def test_top_level_help_lists_every_command_in_plain_text():
    parser, commands = _subparsers()
    text = parser.format_help()
    assert set(commands) == {"run", "generate", "sweep", "info", "schedule", "export", "triton-repo", "comfyui"}
    for name in commands:
        assert f"\n  {name} " in text, name
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_every_option_has_help_and_shows_its_default():
    from bypass_kernels.cli import HelpFormatter

    _, commands = _subparsers()
    for name, sub in commands.items():
        formatter = HelpFormatter(sub.prog)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {action.option_strings or action.dest}"
            assert action.help and action.help.strip(), label
            if not action.required:
                assert "default" in formatter._get_help_string(action), label
        assert "default" in sub.format_help()
    # the options a reviewer found bare
    for name, option in [
        ("run", "--steps"),
        ("run", "--batch"),
        ("run", "--seed"),
        ("info", "--json"),
        ("export", "--opset"),
        ("schedule", "--num-train-timesteps"),
    ]:
        (action,) = (a for a in commands[name]._actions if option in a.option_strings)
        assert len(action.help) > 10, (name, option)


def test_schedule_prints_a_table_not_a_repr(capsys):
    assert main(["schedule", "linear:0.5:400"]) == 0
    out = capsys.readouterr().out
    assert "λ > 0 at 599 of 1000 timesteps, between 401 and 999" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 11
    assert rows[0][:2] == ["999", "0.5000"] and rows[-1][:2] == ["400", "0.0000"]  # one zero row below the range
    assert [int(r[0]) for r in rows] == sorted((int(r[0]) for r in rows), reverse=True)
    for t, lam, *_ in rows:
        assert float(lam) == pytest.approx(max(0.0, 0.5 * (int(t) - 400) / 599), abs=1e-4)


def test_schedule_of_a_sampler_lists_its_timesteps(capsys):
    assert main(["schedule", "for_scheduler:DDIMScheduler:4:0.5:0:0.5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:9].strip().isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("750", "0.5000"), ("500", "0.2500"), ("250", "0.0000"), ("0", "0.0000")]


def test_schedule_off_says_so(capsys):
    assert main(["schedule", "off"]) == 0
    assert "λ = 0 at every timestep" in capsys.readouterr().out


def test_info_is_a_report_for_people(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "auto picks:" in out and "native extension:" in out
    for name in ("triton", "cuda", "cpu", "torch"):
        assert f"\n  {name} " in out, name
    assert "{" not in out  # not a dict's repr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the cuda backend is unavailable")
def test_backend_errors_on_the_command_line_name_the_info_command(capsys):
    assert main(["run", "--backend", "cuda", "--steps", "1", "--no-baseline"]) == 2
    err = capsys.readouterr().err
    _assert_one_line_usage_error(2, err, "'cuda' is unavailable", "bypass-kernels info")
    assert "bypass_kernels.info()" not in err
    with pytest.raises(bypass_kernels.BackendUnavailableError, match=r"See bypass_kernels\.info\(\)") as caught:
        bypass_kernels.backends.require("cuda", "cpu")  # from Python: the Python call
    assert caught.value.backend == "cuda" and caught.value.reason


def test_run_explains_its_summary_line(capsys):
    assert main(["run", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (i,) = (k for k, line in enumerate(lines) if line.startswith("final latents vs the unpatched model"))
    assert "0 = no change" in lines[i - 1] and "unpatched" in lines[i - 1]


def test_comfyui_install_writes_the_custom_node_and_refuses_a_folder_that_is_not_comfyui(tmp_path, capsys):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "nodes.py").write_text("")
    assert main(["comfyui", "install", str(root)]) == 0
    shim = root / "custom_nodes" / "bypass_kernels_node" / "__init__.py"
    assert "from bypass_kernels.comfyui import NODE_CLASS_MAPPINGS" in shim.read_text()
    assert str(shim.parent) in capsys.readouterr().out
    assert main(["comfyui", "install", str(root)]) == 0  # again: already there
    shim.write_text("someone else's node")
    assert main(["comfyui", "install", str(root)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["comfyui", "install", str(root), "--overwrite"]) == 0
    assert main(["comfyui", "install", str(tmp_path / "nowhere")]) == 2
    assert "not a ComfyUI checkout" in capsys.readouterr().err
