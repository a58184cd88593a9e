"""Shared fixtures: tiny diffusers models, op sample inputs, and an independent reference blend."""

from __future__ import annotations

import os

import torch

# Triton kernels run on the CPU through the interpreter when no GPU is visible (must precede their import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the cores: each gets its share of intra-op threads (one each for `-n 2` on
# two cores). More threads than cores make the tiny models' ops wait on each other's spinning threads
# (a tiny-sd step 20-50x slower on a busy machine). Child processes (CLI, export kill tests) inherit it.
if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

import pytest
import torch._inductor.config as inductor_config

import bypass_kernels
from bypass_kernels.presets import build_unet, example_inputs

# Inductor's CPU code, as the tests compile it: scalar C++ (vectorized code takes gcc a third longer
# and changes nothing these tests check: graphs, fusion, recompiles, results; the tests that check
# the vectorized blend ask for it with the `vectorized` fixture), and compiled in the test's own
# process where each worker has one core (a pool of compile processes only adds their start-up).
inductor_config.cpp.simdlen = 1
if "PYTEST_XDIST_WORKER" in os.environ and torch.get_num_threads() == 1:
    inductor_config.compile_threads = 1

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu  # skipped where no GPU is visible (below), selected by `-m gpu`


# The longest files first, as measured (a CI run's --durations): `--dist loadfile` hands out files in
# collection order when xdist's own reordering (by test count) is off (`--no-loadscope-reorder`, in
# the Makefile), and a long file handed out last keeps one worker busy while the other idles. The
# files not named follow in their own order; test_export_runtime.py among them, once test_export.py
# (first) has written the ONNX graphs they share.
LONGEST_FIRST = (
    "test_packaging.py",  # wheel builds: about 2.5 minutes
    "test_export.py",
    "test_triton_server.py",  # builds the server's environment (pip), starts tritonserver
    "test_docs_examples.py",
    "test_serving.py",  # a Ray cluster
    "test_models_compile.py",
    "test_compile.py",
    "test_per_sample.py",
    "test_transformers.py",
    "test_transformer_export.py",
    "test_export_per_sample.py",
    "test_attach.py",
    "test_ops.py",
    "test_comfyui.py",
    "test_bias_experiment.py",
    "test_offload.py",
    "test_codegen.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# Tolerances against the float32 reference: one rounding of the output dtype, plus float32
# reassociation. The Triton interpreter truncates to bfloat16 (a GPU rounds to nearest), so
# bfloat16 allows one ulp.
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
}

ODD_SHAPES = [(1, 3, 5, 7), (5, 64, 9, 11), (3, 1280, 8, 8), (4, 33, 1, 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def available_backends(device: str) -> list[str]:
    names = []
    for name in ("torch", "cpu", "cuda", "triton"):
        try:
            bypass_kernels.backends.require(name, device)
            names.append(name)
        except bypass_kernels.BackendUnavailableError:
            pass
    return names


def sample_inputs(device="cpu", dtypes=DTYPES, shapes=ODD_SHAPES):
    """(case name, mid_out, mid_in, table, timestep) tuples shared by the reference, opcheck and compile tests."""
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(1000, generator=gen, dtype=torch.float32).to(device)
    for shape in shapes:
        for dtype in dtypes:
            b = shape[0]
            m = torch.randn(shape, generator=gen).to(device, dtype)
            h = torch.randn(shape, generator=gen).to(device, dtype)
            per_sample = torch.tensor([999.5, 0.5, 498.5, -3.0, 2000.0][:b] + [17.0] * max(0, b - 5))
            timesteps = {
                "scalar_int": torch.tensor(500, device=device),
                "one_tie": torch.tensor([600.5], device=device),
                "fraction": torch.tensor([123.4], dtype=torch.float64, device=device),
                "per_sample": per_sample[:b].to(device),
                "out_of_range": torch.tensor([1e6], device=device),
            }
            for tname, t in timesteps.items():
                yield f"{tuple(shape)}-{str(dtype)[6:]}-{tname}", m, h, table, t
            # a schedule per sample: a [batch, T] table, with one timestep and with one per sample
            rows = torch.rand(b, 1000, generator=gen, dtype=torch.float32).to(device)
            for tname in ("scalar_int", "per_sample"):
                yield f"{tuple(shape)}-{str(dtype)[6:]}-rows_{tname}", m, h, rows, timesteps[tname]


def hand_hook(unet, weight_of):
    """An independent reference: a forward hook that blends with λ from ``weight_of(t)`` (Python
    floats, per sample), written without any of the package's table or kernel code."""
    state = {}

    def keep(module, args, kwargs):
        state["t"] = kwargs["timestep"] if "timestep" in kwargs else args[1]

    def mix(module, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        t = torch.as_tensor(state["t"]).reshape(-1).tolist()
        lam = torch.tensor([weight_of(v) for v in t], dtype=torch.float32).reshape(-1, 1, 1, 1)
        return ((1 - lam) * out.float() + lam * h.float()).to(out.dtype)

    handles = [
        unet.register_forward_pre_hook(keep, with_kwargs=True),
        unet.mid_block.register_forward_hook(mix, with_kwargs=True),
    ]
    return handles


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several threads on a shared CPU slow them ten-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vectorized():
    """Inductor's default vectorized CPU code for this test (the suite compiles scalar code)."""
    with inductor_config.patch({"cpp.simdlen": None}):
        yield


@pytest.fixture(scope="session")
def tiny_sd():
    return build_unet("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    return build_unet("tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_unet2d():
    return build_unet("tiny-unet2d")


@pytest.fixture(params=["tiny-sd", "tiny-sdxl", "tiny-unet2d"])
def any_unet(request, tiny_sd, tiny_sdxl, tiny_unet2d):
    return {"tiny-sd": tiny_sd, "tiny-sdxl": tiny_sdxl, "tiny-unet2d": tiny_unet2d}[request.param]


@pytest.fixture(autouse=True)
def _never_leave_patched(tiny_sd, tiny_sdxl, tiny_unet2d):
    yield
    for unet in (tiny_sd, tiny_sdxl, tiny_unet2d):
        bypass_kernels.unpatch(unet)


# -- exported graphs, shared by test_export.py and test_export_runtime.py (an export takes ~30 s)
GRAPH_SCHEDULE = bypass_kernels.BypassSchedule.linear(0.8, t_min=300)


def _shared_graph(tmp_path_factory, name: str, *, patched: bool, **options) -> dict:
    """``tiny_models.graph_unet(name)`` (seeded weights) exported once per test run with GRAPH_SCHEDULE:
    patched with it (a patched model exports with its own schedule) or unpatched and given it. The xdist workers share
    the graph through a file lock in the run's temporary folder; each gets its own model, identical
    to the exported one."""
    import pickle

    from bypass_kernels.export import to_onnx
    from filelock import FileLock
    from tiny_models import graph_unet

    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the folder of this run, shared by its workers
    folder = base / f"shared-graph-{name}"
    unet = graph_unet(name)
    if patched:
        bypass_kernels.patch(unet, GRAPH_SCHEDULE)
    with FileLock(str(folder) + ".lock"):
        done = folder / "result.pickle"
        if not done.exists():
            folder.mkdir(exist_ok=True)
            result = to_onnx(unet, str(folder / "unet.onnx"), None if patched else GRAPH_SCHEDULE, **options)
            done.write_bytes(pickle.dumps(result))
        result = pickle.loads(done.read_bytes())
    return dict(unet=unet, path=result.path, result=result)


@pytest.fixture(scope="session")
def sd_graph(tmp_path_factory):
    """An SD UNet, patched with GRAPH_SCHEDULE, exported with the schedule baked in (dynamic shapes)."""
    return _shared_graph(tmp_path_factory, "sd", patched=True)


@pytest.fixture(scope="session")
def sdxl_graph(tmp_path_factory):
    """An SDXL UNet, unpatched, exported with GRAPH_SCHEDULE as a graph input (any table at run time)."""
    return _shared_graph(tmp_path_factory, "sdxl", patched=False, schedule_as_input=True)


def run_unet(unet, inputs, **overrides):
    with torch.no_grad():
        return unet(**{**inputs, **overrides}, return_dict=False)[0]


__all__ = ["example_inputs"]
