"""bypass-kernels sweep: schedules side by side from the same seeds in one batched call, as a labelled grid;
each row equals that schedule run alone, offline on the shipped model and on a pipeline folder."""

import os

import tiny_pipelines
import torch
from PIL import Image

from bypass_kernels import BypassSchedule, cli, patched
from bypass_kernels.experiments import datasets
from bypass_kernels.experiments.sampling import ddim_sample
from bypass_kernels.experiments.sweep import _noise, sweep

SPECS = ["off", "linear:0.6:500", "constant:0.5"]


def test_sweep_of_the_shipped_model_equals_each_schedule_run_alone(tmp_path):
    from diffusers import UNet2DModel

    result = sweep("shapes", SPECS, out=str(tmp_path), n=3, steps=4, seed=5)
    assert result.images.shape[:2] == (3, 3) and result.labels == ["off (no bypass)", *SPECS[1:]]
    assert Image.open(result.path).size[1] > 3 * 16  # a row per schedule
    unet = UNet2DModel.from_pretrained(datasets.shipped_folder("shapes"), low_cpu_mem_usage=False).eval()
    noise = _noise(3, (3, 16, 16), 5)
    for row, spec in zip(result.images, SPECS, strict=True):
        with patched(unet, BypassSchedule.parse(spec)):
            alone = ddim_sample(unet, noise, 4)
        torch.testing.assert_close(row, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(result.images[0], result.images[1], atol=1e-3)


def test_the_sweep_command_on_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "tokenizer").mkdir()
    pipe = tiny_pipelines.sd_pipeline(tmp_path / "tokenizer")
    pipe.save_pretrained(tmp_path / "pipe")
    argv = ["sweep", "--model", str(tmp_path / "pipe"), "--prompt", "a red square", "--n", "2", "--steps", "3"]
    argv += [x for spec in SPECS for x in ("--schedule", spec)]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "3 schedules x 2 seeds" in printed and "row 2: linear:0.6:500" in printed
    assert os.path.isfile(tmp_path / "out" / "sweep.png")
    assert cli.main(["sweep", "--model", str(tmp_path / "pipe"), "--out", str(tmp_path / "o2")]) == 2
    assert "needs a prompt" in capsys.readouterr().err
