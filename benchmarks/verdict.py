"""The verdict of one GPU run: each performance goal of the kernels and the patch, its measured value, and
PASS, FAIL or SKIPPED (no rows for it: the step did not run, failed, or ran out of budget).

Reads what benchmarks/gpu_check.sh leaves in $OUT (standard library only, any Python):

    python benchmarks/verdict.py --microbench OUT/microbench.csv --host-cost OUT/host_cost.csv \
        --unet-step OUT/unet_step.csv --junit OUT/gpu_tests.xml [--out OUT/verdict.md]

Each target is judged on its measured value (a median); where the rows carry an interval it is
shown beside the value, and an overhead whose interval includes 0 is marked "within noise".
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rows import latest, number, read

KERNELS = ("triton", "cuda")  # the package's fused kernels on a GPU
COPY_SHARE_MIN = 0.95  # of the measured copy bandwidth, at 64M elements, every dtype
OVER_C_MIN = 3.0  # baseline (c) / kernel at the SD1.5 mid-block, CUDA-graph replay
STEP_OVERHEAD_MAX_PCT = 0.3  # patched_auto against unpatched, per UNet step
HOST_COST_MAX = 1.5  # blend_ host time per call / add_ on the same tensors, SD1.5 mid-block
UNET_CASES = (("sd15", "cuda_graph"), ("sdxl", "cuda_graph"), ("sd15", "compile"), ("sd15", "reduce-overhead"))
NO_SYNC_TEST = "test_eager_patched_forward_has_no_host_sync"
DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class Target:
    target: str
    value: str
    status: str  # PASS, FAIL or SKIPPED


def _judge(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _per_dtype(values: dict, fmt) -> str:
    return ", ".join(f"{d} {fmt(values[d])}" for d in DTYPES if d in values)


def copy_bandwidth(micro: list[dict]) -> list[Target]:
    out = []
    for kernel in KERNELS:
        name = f"{kernel}: ≥ {COPY_SHARE_MIN:.0%} of copy bandwidth at 64M elements, every dtype (CUDA-graph replay)"
        graph = {r["dtype"]: number(r["copy_share"]) for r in micro if _is(r, kernel, "64M", "cuda_graph")}
        plain = {r["dtype"]: number(r["copy_share"]) for r in micro if _is(r, kernel, "64M", "plain")}
        if not graph:
            out.append(Target(name, "no CUDA-graph rows at 64M", "SKIPPED"))
            continue
        worst = min(graph.values())
        value = f"min {worst:.1%} ({_per_dtype(graph, lambda x: f'{x:.1%}')})"
        if plain:
            value += f"; plain launches {min(plain.values()):.0%}–{max(plain.values()):.0%}"
        out.append(Target(name, value, _judge(worst >= COPY_SHARE_MIN)))
    return out


def over_baseline_c(micro: list[dict]) -> list[Target]:
    out = []
    base = {r["dtype"]: number(r["median_us"]) for r in micro if _is(r, "eager_gather", "sd15_mid", "cuda_graph")}
    for kernel in KERNELS:
        name = f"{kernel}: ≥ {OVER_C_MIN:g}× baseline (c) at the SD1.5 mid-block 2×1280×8×8 (CUDA-graph replay)"
        mine = {r["dtype"]: number(r["median_us"]) for r in micro if _is(r, kernel, "sd15_mid", "cuda_graph")}
        ratios = {d: base[d] / mine[d] for d in mine if base.get(d) and mine[d]}
        if not ratios:
            out.append(Target(name, "no CUDA-graph rows for the kernel and (c) at sd15_mid", "SKIPPED"))
            continue
        worst = min(ratios.values())
        value = f"min {worst:.2f}× ({_per_dtype(ratios, lambda x: f'{x:.2f}×')})"
        out.append(Target(name, value, _judge(worst >= OVER_C_MIN)))
    return out


def one_kernel(micro: list[dict]) -> list[Target]:
    out = []
    for kernel in KERNELS:
        name = f"{kernel}: one kernel per blend"
        counts = [number(r["kernels_per_call"]) for r in micro if r["provider"] == kernel]
        counts = [c for c in counts if c is not None]
        if not counts:
            out.append(Target(name, "no rows", "SKIPPED"))
            continue
        value = f"{min(counts):g}–{max(counts):g} kernels per call over {len(counts)} rows"
        if min(counts) == max(counts):
            value = f"{counts[0]:g} kernel per call in all {len(counts)} rows"
        out.append(Target(name, value, _judge(max(counts) == 1)))
    return out


def step_overhead(unet: list[dict]) -> list[Target]:
    out = []
    for model, mode in UNET_CASES:
        name = f"UNet step overhead ≤ {STEP_OVERHEAD_MAX_PCT}%: {model}, {mode}, patched_auto vs unpatched"
        row = next((r for r in unet if (r["model"], r["mode"], r["variant"]) == (model, mode, "patched_auto")), None)
        if row is None:
            out.append(Target(name, "no row", "SKIPPED"))
            continue
        status = row.get("status", "ok") or "ok"
        pct = number(row.get("overhead_pct"))
        if status != "ok" or pct is None:
            out.append(Target(name, f"no figure ({status})", "FAIL"))
            continue
        value = row.get("overhead") or f"{pct:+.3f}%"
        kernels = number(row.get("kernels_per_step"))
        ref = next((r for r in unet if (r["model"], r["mode"], r["variant"]) == (model, mode, "unpatched")), {})
        ref_kernels = number(ref.get("kernels_per_step"))
        if kernels is not None and ref_kernels is not None:
            value += f"; kernels {kernels:g} vs {ref_kernels:g}"
        out.append(Target(name, value, _judge(pct <= STEP_OVERHEAD_MAX_PCT)))
    return out


def host_sync(unet: list[dict], cases: dict) -> Target:
    name = "no host sync in an eager patched UNet step"
    counts = {
        f"{r['model']} {r['variant']}": number(r.get("host_syncs"))
        for r in unet
        if r["mode"] == "eager" and r["variant"].startswith("patched_") and number(r.get("host_syncs")) is not None
    }
    parts, failed = [], False
    if counts:
        parts.append(", ".join(f"{k}: {v:g}" for k, v in counts.items()) + " syncs per step")
        failed = any(v > 0 for v in counts.values())
    test = next((v for k, v in cases.items() if k.endswith(NO_SYNC_TEST)), None)
    if test is not None:
        parts.append(f"{NO_SYNC_TEST}: {test}")
        failed = failed or test in ("failed", "error")
    measured = bool(counts) or test == "passed"
    if not measured and not failed:
        return Target(name, "; ".join(parts) or "not measured (no eager host_syncs column, test not run)", "SKIPPED")
    return Target(name, "; ".join(parts), _judge(not failed))


def gpu_tests(junit_path: str | None) -> tuple[Target, dict]:
    name = 'GPU tests pass (pytest -m "gpu or tensorrt")'
    if not junit_path or not os.path.exists(junit_path):
        return Target(name, "no junit xml", "SKIPPED"), {}
    cases, note = junit_cases(junit_path)
    counts = {k: sum(1 for v in cases.values() if v == k) for k in ("passed", "failed", "error", "skipped")}
    value = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no tests collected"
    bad = [k.strip(":") for k, v in cases.items() if v in ("failed", "error")]
    if bad:
        value += " (" + ", ".join(bad[:5]) + (", …" if len(bad) > 5 else "") + ")"
    return Target(name, value + note, _judge(counts["passed"] > 0 and not bad)), cases


OUTCOMES = {"failure": "failed", "error": "error", "skipped": "skipped"}


def junit_cases(path: str) -> tuple[dict, str]:
    """``({"classname::name": passed|failed|error|skipped}, note)``. A file that is not well-formed
    XML (a log scrubber that wrote ``<python>`` into a traceback, say) is read tag by tag instead."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    cases = {}
    try:
        for case in ET.fromstring(text).iter("testcase"):
            if case.get("name"):  # a test cut short by an interrupt is written without a name
                tag = next((t for t in OUTCOMES if case.find(t) is not None), None)
                cases[f"{case.get('classname', '')}::{case.get('name')}"] = OUTCOMES.get(tag, "passed")
        return cases, ""
    except ET.ParseError:
        pass
    pattern = r"<testcase\b([^>]*?)(/>|>(.*?)</testcase>)"
    for attrs, _, body in re.findall(pattern, text, flags=re.S):
        get = dict(re.findall(r'(\w+)="([^"]*)"', attrs)).get
        if not get("name"):
            continue
        tag = next((t for t in OUTCOMES if body and re.search(rf"<{t}\b", body)), None)
        cases[f"{get('classname', '')}::{get('name', '')}"] = OUTCOMES.get(tag, "passed")
    return cases, " (junit xml not well-formed: read tag by tag)"


def host_cost(rows: list[dict]) -> list[Target]:
    out = []
    for r in rows:
        if r.get("call") != "blend_" or r.get("size") != "sd15_mid" or r.get("backend") not in ("cuda", "cpu"):
            continue
        ratio = number(r.get("ratio_to_add"))
        name = f"{r['backend']}: blend_ host cost ≤ {HOST_COST_MAX:g}× one add_ at the SD1.5 mid-block ({r['dtype']})"
        if ratio is None:
            out.append(Target(name, "no figure", "FAIL"))
            continue
        lo, hi = number(r.get("ratio_lo")), number(r.get("ratio_hi"))
        value = f"{ratio:.2f}× [{lo:.2f}, {hi:.2f}] ({r['median_us']} µs per call)"
        out.append(Target(name, value, _judge(ratio <= HOST_COST_MAX)))
    if not out:
        name = f"blend_ host cost ≤ {HOST_COST_MAX:g}× one add_ at the SD1.5 mid-block"
        out.append(Target(name, "no rows", "SKIPPED"))
    return out


def _is(row: dict, provider: str, size: str, mode: str) -> bool:
    return row["provider"] == provider and row["size"] == size and row["mode"] == mode


def verdict(microbench=None, unet_step=None, junit=None, host_costs=None) -> list[Target]:
    micro = latest(read(microbench), ("provider", "size", "dtype", "mode"))
    unet = latest(read(unet_step), ("model", "variant", "mode"))
    hosts = latest(read(host_costs), ("call", "backend", "size", "dtype"))
    tests, cases = gpu_tests(junit)
    return [
        *copy_bandwidth(micro),
        *over_baseline_c(micro),
        *one_kernel(micro),
        *step_overhead(unet),
        host_sync(unet, cases),
        tests,
        *host_cost(hosts),
    ]


def markdown(targets: list[Target]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t.target} | {t.value.replace('|', '/')} | {t.status} |" for t in targets]
    counts = {s: sum(t.status == s for t in targets) for s in ("PASS", "FAIL", "SKIPPED")}
    lines.append("")
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbench")
    parser.add_argument("--unet-step")
    parser.add_argument("--junit")
    parser.add_argument("--host-cost")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    text = markdown(verdict(args.microbench, args.unet_step, args.junit, args.host_cost))
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
