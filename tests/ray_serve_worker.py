"""Serve a pipeline folder with Ray Serve (a local cluster on 127.0.0.1, 2 replicas) and send it concurrent
HTTP requests: ``python ray_serve_worker.py PIPELINE_FOLDER REQUESTS.json OUT.json``. One process: the
cluster starts once. tests/test_serving.py runs it (in a network namespace with loopback only, as root)."""

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import ray
from ray import serve

from bypass_kernels.serving.ray_serve import build_app


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=240) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def main(folder: str, requests_path: str, out_path: str) -> None:
    with open(requests_path) as f:
        bodies = json.load(f)
    start = time.monotonic()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",  # every listener and every target on the loopback address
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        folder,
        num_replicas=2,
        ray_actor_options={"num_cpus": 0.5},
        device="cpu",
        max_batch_size=4,
        batch_wait_timeout_s=1.0,  # the concurrent requests meet in batches even on a busy machine
    )
    serve.run(app, route_prefix="/", blocking=False)  # returns once the replicas are up
    ready = time.monotonic() - start
    url = f"http://127.0.0.1:{port}/"
    answers = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(index):
        barrier.wait(timeout=60)
        answers[index] = post(url, bodies[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    refused = post(url, {"prompt": "x", "steps": 3})
    with open(out_path, "w") as f:
        json.dump({"answers": answers, "refused": refused, "ready_s": ready}, f)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
