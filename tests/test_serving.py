"""Serving: requests with a schedule each (GenerationRequest), run as batched pipeline calls equal to single
calls (generate_batch), and the Ray Serve deployment on a real local cluster (2 replicas, concurrent HTTP
clients, loopback only)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_pipelines
import torch

from bypass_kernels import BypassSchedule, default_schedule, patch, set_schedule
from bypass_kernels.serving.requests import GenerationRequest, decode_latents, generate_batch

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {"num_inference_steps": 3, "height": 32, "width": 32, "guidance_scale": 4.0, "output": "latent"}
BODIES = [
    dict(SETTINGS, prompt="a red square", schedule="linear:0.8:300", seed=1),
    dict(SETTINGS, prompt="a blue circle", schedule="off", seed=2),
    dict(SETTINGS, prompt="a green cross", seed=3),  # the deployment's schedule
    dict(SETTINGS, prompt="a red square", schedule={"shape": "constant", "strength": 0.5}, seed=4),
    dict(SETTINGS, prompt="a grey dot", schedule="linear:0.3:500", seed=5, negative_prompt="blurry"),
    dict(SETTINGS, prompt="a red square", schedule="linear:0.8:300", seed=6, num_inference_steps=2),
    dict(SETTINGS, prompt="two lines", schedule="constant:0.2", seed=7),
    dict(SETTINGS, prompt="a blue circle", schedule="linear:0.6:700", seed=8),
]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving")
    pipe = tiny_pipelines.sd_pipeline(folder)
    patch(pipe)
    return pipe, folder


def single(pipe, body) -> np.ndarray:
    """The request run alone, as a user of the pipeline would."""
    request = GenerationRequest.from_json(body)
    set_schedule(pipe, request.schedule or default_schedule())
    try:
        out = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            height=request.height,
            width=request.width,
            generator=torch.Generator().manual_seed(request.seed),
            output_type="latent",
        )
    finally:
        set_schedule(pipe, default_schedule())
    return out.images[0].numpy()


def close(got, want) -> bool:  # a batched call and a single one differ by float32 rounding
    return float(np.linalg.norm(got - want) / np.linalg.norm(want)) < 1e-5


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "must be a JSON object"),
        ({"prompt": "x", "steps": 3}, "unknown field(s) steps; the fields are prompt, negative_prompt"),
        ({"prompt": 3}, "prompt: a string is required"),
        ({"prompt": "x", "seed": -1}, "seed: expected a whole number"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps: expected at least 1"),
        ({"prompt": "x", "guidance_scale": "7"}, "guidance_scale: expected a number"),
        ({"prompt": "x", "output": "jpg"}, "output: expected one of png, latent"),
        ({"prompt": "x", "schedule": "linear:x"}, "schedule spec 'linear:x': STRENGTH is a number"),
        ({"prompt": "x", "schedule": "/etc/passwd"}, "schedule spec '/etc/passwd': expected 'default'"),  # no file
        ({"prompt": "x", "schedule": 3}, "schedule: expected a spec string"),
    ],
)
def test_a_request_is_checked_field_by_field(body, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GenerationRequest.from_json(body)


def test_a_batch_of_requests_equals_each_request_alone(sd):
    pipe, _ = sd
    requests = [GenerationRequest.from_json(b) for b in BODIES[:6]]
    results = generate_batch(pipe, requests, default_schedule())
    assert [r["batch_size"] for r in results] == [5, 5, 5, 5, 5, 1]  # the 2-step request runs apart
    for body, result in zip(BODIES, results, strict=False):
        assert close(decode_latents(result), single(pipe, body)), body
    # the schedules matter: one request under another schedule is far from its result
    other = single(pipe, dict(BODIES[0], schedule="off"))
    assert not close(decode_latents(results[0]), other)


def test_a_png_result_and_a_failing_group_report_per_request(sd):
    import base64
    import io

    from PIL import Image

    pipe, _ = sd
    png = dict(SETTINGS, prompt="x", output="png")
    odd = dict(SETTINGS, prompt="x", height=30)  # not a multiple of 8: the pipeline refuses
    results = generate_batch(pipe, [GenerationRequest.from_json(b) for b in (png, odd)], BypassSchedule.constant(0))
    assert Image.open(io.BytesIO(base64.b64decode(results[0]["image"]))).size == (32, 32)
    assert "error" in results[1] and "divisible by 8" in results[1]["error"]


def _loopback_only(command: list[str]) -> list[str] | None:
    """``command`` run in a network namespace with the loopback interface alone, or None where this user
    cannot make one (root, unshare and ip are needed). Ray probes outside addresses to learn its own
    (a UDP "connection" to a public DNS server) whatever node address it is given: in the namespace
    there is no route, so nothing leaves the machine."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    return None


def test_ray_serve_batches_concurrent_requests_over_two_replicas(sd, tmp_path):
    pytest.importorskip("ray.serve")
    isolated = _loopback_only(["true"])
    if isolated is None:
        pytest.skip("needs a network namespace with loopback only (root, unshare and ip): Ray probes outside addresses")
    pipe, _ = sd
    saved = tmp_path / "pipeline"
    pipe.save_pretrained(saved)  # what the replicas load, as a user's folder
    (tmp_path / "requests.json").write_text(json.dumps(BODIES))
    command = [sys.executable, os.path.join(HERE, "ray_serve_worker.py"), str(saved), str(tmp_path / "requests.json")]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    done = subprocess.run(
        _loopback_only([*command, str(tmp_path / "out.json")]),  # (made above: not None)
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    statuses = [status for status, _ in report["answers"]]
    assert statuses == [200] * len(BODIES), report["answers"]
    answers = [answer for _, answer in report["answers"]]
    assert len({a["replica"] for a in answers}) == 2  # both replicas served
    assert max(a["batch_size"] for a in answers) > 1  # @serve.batch joined concurrent requests
    for body, answer in zip(BODIES, answers, strict=True):
        assert close(decode_latents(answer), single(pipe, body)), (body, answer["batch_size"])
    status, refused = report["refused"]
    assert status == 400 and "unknown field(s) steps" in refused["error"]
