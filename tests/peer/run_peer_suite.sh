#!/usr/bin/env bash
# diffusers' own tests with every model patched (the bypass_peer plugin beside this script), against the
# same tests unpatched and patched at λ = 0. Not part of the project's test suite: it takes tens of
# minutes on two cores.
#
#   DIFFUSERS_TESTS=<diffusers checkout>/tests bash tests/peer/run_peer_suite.sh [unets|transformers|pipelines]...
#
# Needs: the project installed (make install), plus the packages those tests import:
#   pip install parameterized requests-mock peft sentencepiece protobuf
# The pipeline tests load tiny tokenizers from the Hugging Face Hub: offline, point HF_HOME at a cache
# holding them and set HF_HUB_OFFLINE=1. PEER_WORKERS: pytest-xdist workers (2). Results: junit XML and a one-line summary per run in
# $PEER_OUT (default peer-results/), and a table at the end; a test that ends differently patched
# than unpatched is listed.
set -uo pipefail
: "${DIFFUSERS_TESTS:?set DIFFUSERS_TESTS to the tests/ folder of a checkout of diffusers repository}"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
out=$(mkdir -p "${PEER_OUT:-peer-results}" && cd "${PEER_OUT:-peer-results}" && pwd)
lambda=${BYPASS_PEER_LAMBDA:-0.3}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(unets transformers pipelines)

# The transformer families the package bypasses, and the DiT pipelines built on them
transformers=(pixart_transformer2d transformer_sd3 transformer_flux transformer_sana transformer_wan
  transformer_cogvideox transformer_hunyuan_video transformer_ltx transformer_mochi transformer_qwenimage)
files_of() {
  case $1 in
    unets) echo "$DIFFUSERS_TESTS/models/unets" ;;
    transformers) for name in "${transformers[@]}"; do echo "$DIFFUSERS_TESTS/models/transformers/test_models_$name.py"; done ;;
    pipelines) for d in flux pixart_sigma stable_diffusion_3 wan; do echo "$DIFFUSERS_TESTS/pipelines/$d"; done ;;
    *) echo "unknown suite $1 (unets, transformers or pipelines)" >&2; return 1 ;;
  esac
}

run() {  # suite, variant, extra pytest arguments...
  local suite=$1 variant=$2
  shift 2
  local name="$suite-$variant"
  # shellcheck disable=SC2046
  (cd "$DIFFUSERS_TESTS/.." && PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$python" -m pytest -q -n "${PEER_WORKERS:-2}" \
    -p no:cacheprovider --junitxml="$out/$name.xml" "$@" $(files_of "$suite")) > "$out/$name.log" 2>&1
  printf '%-14s %-22s %s\n' "$suite" "$variant" "$(grep -E '(passed|failed)' "$out/$name.log" | tail -n 1)" \
    | tee -a "$out/summary.txt"
}

for suite in "${suites[@]}"; do
  files_of "$suite" > /dev/null || exit 2
  run "$suite" unpatched
  BYPASS_PEER_LAMBDA=$lambda run "$suite" "patched-$lambda" -p bypass_peer
  BYPASS_PEER_LAMBDA=0 run "$suite" patched-0 -p bypass_peer
  # tests that end differently patched than unpatched
  "$python" - "$out/$suite-unpatched.xml" "$out/$suite-patched-$lambda.xml" "$out/$suite-patched-0.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET


def outcomes(path):
    ends = {}
    for case in ET.parse(path).iter("testcase"):
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        ends[f"{case.get('classname')}::{case.get('name')}"] = kind
    return ends


base = outcomes(sys.argv[1])
for path in sys.argv[2:]:
    ends = outcomes(path)
    changed = sorted(k for k in base.keys() | ends.keys() if base.get(k) != ends.get(k))
    print(f"{path.rsplit('/', 1)[-1]}: {len(changed)} tests end differently than unpatched")
    for k in changed:
        print(f"  {k}: {base.get(k)} -> {ends.get(k)}")
EOF
done
echo "summary: $out/summary.txt"
