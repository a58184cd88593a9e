"""A real Triton Inference Server for the tests: the tritonserver binary that nvidia-pytriton ships
(python backend only), in an environment of its own, listening on the loopback address only.

The environment (``.venv/triton-env``, built once): nvidia-pytriton (the server; none of its Python
dependencies, which serve PyTriton's own API) and numpy < 2 (the python backend stub returns no output
tensors with numpy 2); onnxruntime, torch, diffusers and bypass_kernels come from the test
environment's site-packages (added after its own, so its numpy < 2 wins). The backend stub
embeds the Python whose ``bin`` is first on PATH, and finds libpython through LD_LIBRARY_PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request

REQUIREMENTS = ["nvidia-pytriton==0.7.0", "numpy<2"]
ENV = os.path.join(sys.prefix, "triton-env")


def env_python() -> str:
    return os.path.join(ENV, "bin", "python")


def _site_packages(prefix: str) -> str:
    return os.path.join(prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")


def ensure_env() -> str:
    """Build the server's environment if missing (pip, from the package index); its folder."""
    stamp = os.path.join(ENV, ".ready")
    if os.path.exists(stamp):
        return ENV
    shutil.rmtree(ENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", ENV], check=True)
    pip = [env_python(), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", *REQUIREMENTS]
    done = subprocess.run(pip, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pip install {' '.join(REQUIREMENTS)} failed:\n{done.stderr[-2000:]}")
    # torch, diffusers and bypass_kernels from the test environment, after this one's own packages
    with open(os.path.join(_site_packages(ENV), "zz_test_env.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({_site_packages(sys.prefix)!r})\n")
    open(stamp, "w").close()
    return ENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distribution() -> tuple[str, str]:
    """pytriton's tritonserver folder and its shared libraries, in the server's environment."""
    site = _site_packages(ENV)
    return os.path.join(site, "pytriton", "tritonserver"), os.path.join(site, "nvidia_pytriton.libs")


@contextlib.contextmanager
def running_server(repository: str, workdir: str, *, timeout: float = 120.0):
    """Start tritonserver on ``repository`` (HTTP on 127.0.0.1, no gRPC or metrics listeners); yields its
    URL; stops it on exit. The log is ``workdir/tritonserver.log``."""
    dist, libs = _distribution()
    server = os.path.join(workdir, "tritonserver")
    if not os.path.isdir(server):  # pytriton's layout: the stub for this Python in backends/python
        shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = os.path.join(dist, "python_backend_stubs", version, "triton_python_backend_stub")
        shutil.copy(stub, os.path.join(server, "backends", "python"))
    env = dict(os.environ)
    env["PATH"] = os.path.join(ENV, "bin") + os.pathsep + env.get("PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, sysconfig.get_config_var("LIBDIR")]))
    env.pop("PYTHONPATH", None)
    env["OMP_NUM_THREADS"] = "1"  # several model instances on two cores
    port = _free_port()
    command = [
        os.path.join(server, "bin", "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={os.path.join(server, 'backends')}",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--exit-timeout-secs=5",
    ]
    log_path = os.path.join(workdir, "tritonserver.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({process.returncode}):\n{_tail(log_path)}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready in {timeout:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: str, lines: int = 40) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])
