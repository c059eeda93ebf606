#!/usr/bin/env bash
# One-shot GPU check (<= 5 minutes on one GPU): build the native extension with its CUDA part,
# run every kernel test on CUDA (Triton, native and reference; fp32, fp16, bf16), the kernel
# micro-benchmarks at SD 1.5 shapes against PEFT's loop and the roofline, and an end-to-end
# generate with compile=True over a mixed adapter batch. Writes $OUT/gpu_check.json (every
# step's status, seconds and results) and $OUT/gpu_check.log.
#
# Runs with the machine's own python3 and torch: impasto goes on PYTHONPATH through a shim
# folder (impasto -> engine/, impasto/kernels -> kernels/), nothing of the pinned stack is
# installed. Pure-Python wheels the machine lacks (diffusers and importlib_metadata) come from a
# .whl/ folder carried with the checkout; fill it on a machine with pip access first:
#
#     benchmarks/gpu_check.sh --fetch-wheels        # here: pip download into .whl/
#     benchmarks/gpu_check.sh                       # there, e.g. run(command=..., carry=[".whl"])
#     benchmarks/gpu_check.sh --dry-run --out DIR   # anywhere: the plan and the JSON, no GPU work
#
# Options: --out DIR (default $OUT, else ./gpu_check_out), --steps a,b,... (a subset of
# env,wheels,build,tests,bench,e2e), --dry-run, --fetch-wheels, -h/--help.
set -uo pipefail

ALL_STEPS="env,wheels,build,tests,bench,e2e"
WHEELS=("diffusers==0.42.1" "importlib_metadata==10.2.0")
PY="${PYTHON:-python3}"
out_dir="${OUT:-}"
steps="$ALL_STEPS"
dry_run=0
fetch=0

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --fetch-wheels) fetch=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a folder" >&2; exit 2; }; out_dir="$2"; shift ;;
        --out=*) out_dir="${1#--out=}" ;;
        --steps) [ $# -ge 2 ] || { echo "gpu_check: --steps needs a list" >&2; exit 2; }; steps="$2"; shift ;;
        --steps=*) steps="${1#--steps=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
IFS=',' read -r -a step_list <<< "$steps"
for s in "${step_list[@]}"; do
    case ",$ALL_STEPS," in *",$s,"*) ;; *) echo "gpu_check: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2

if [ "$fetch" = 1 ]; then
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

out_dir="${out_dir:-$ROOT/gpu_check_out}"
mkdir -p "$out_dir" || exit 2
LOG="$out_dir/gpu_check.log"
STEPS_TSV="$out_dir/.steps.tsv"
: > "$LOG"
: > "$STEPS_TSV"

# impasto importable from the checkout: a shim package linking engine/'s entries and kernels/.
SHIM="${TMPDIR:-/tmp}/impasto_shim.$$"
mkdir -p "$SHIM/impasto"
for f in "$ROOT"/engine/*; do ln -sfn "$f" "$SHIM/impasto/$(basename "$f")"; done
ln -sfn "$ROOT/kernels" "$SHIM/impasto/kernels"
SITE="${TMPDIR:-/tmp}/impasto_site.$$"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export IMPASTO_NATIVE_BUILD_DIR="$out_dir/.native_build"
unset TRITON_INTERPRET  # real Triton launches on the GPU (tests/conftest.py sets it only if unset)
export TRITON_INTERPRET=0

want() { case ",$steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME LIMIT_SECONDS COMMAND...: run it (unless a dry run), log it, record rc and seconds.
# The limits add up to 570 s, under the device tool's 600 s per command; expected total ~4-5 min.
step() {
    local name="$1" limit="$2"
    shift 2
    if ! want "$name"; then printf '%s\tnot-selected\t0\t0\n' "$name" >> "$STEPS_TSV"; return 0; fi
    echo "=== $name: $*" | tee -a "$LOG"
    if [ "$dry_run" = 1 ]; then printf '%s\tdry-run\t0\t0\n' "$name" >> "$STEPS_TSV"; return 0; fi
    local t0 rc
    t0=$(date +%s%N)
    timeout "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$([ $rc = 0 ] && echo ok || echo failed)" "$rc" \
        "$(awk "BEGIN { print ($(date +%s%N) - $t0) / 1e9 }")" >> "$STEPS_TSV"
    echo "=== $name: rc=$rc" | tee -a "$LOG"
    return 0
}

step env 30 "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print('triton', triton.__version__); import impasto; print('impasto from', impasto.__file__)"
step wheels 30 bash -c "ls .whl/*.whl >/dev/null && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target '$SITE' .whl/*.whl"
export PYTHONPATH="$PYTHONPATH:$SITE"
step build 150 "$PY" -c "from impasto.kernels import native; print(native.build(cuda=True, verbose=True)); print('cuda kernels:', native.has_cuda_kernels())"
export IMPASTO_NATIVE_LIB="$IMPASTO_NATIVE_BUILD_DIR/impasto_native_cuda/impasto_native_cuda.so"
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_native.py --junitxml="$out_dir/tests.xml"
step bench 90 "$PY" benchmarks/bench_native.py --device cuda --json "$out_dir/bench_native.json"
step e2e 150 "$PY" benchmarks/gpu_e2e.py --device cuda --json "$out_dir/e2e.json"

"$PY" - "$out_dir" "$dry_run" "$steps" <<'EOF'
import json, os, platform, sys
out, dry, selected = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split(",")
steps = []
for line in open(os.path.join(out, ".steps.tsv")):
    name, status, rc, secs = line.rstrip("\n").split("\t")
    steps.append({"name": name, "status": status, "rc": int(rc), "seconds": round(float(secs or 0), 1)})
env = {"python": platform.python_version(), "machine": platform.machine()}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as e:  # the check still reports what it found
    env["torch"] = f"not importable: {e}"
results = {}
for key, name in (("bench", "bench_native.json"), ("e2e", "e2e.json")):
    path = os.path.join(out, name)
    if os.path.isfile(path):
        with open(path) as f:
            results[key] = json.load(f)
ran = [s for s in steps if s["status"] in ("ok", "failed")]
report = {
    "dry_run": dry,
    "selected": selected,
    "ok": (not dry) and bool(ran) and all(s["status"] == "ok" for s in ran),
    "env": env,
    "steps": steps,
    "results": results,
    "log": "gpu_check.log",
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps({k: report[k] for k in ("dry_run", "ok", "steps")}, indent=1))
EOF
rc=$?
rm -f "$STEPS_TSV"
rm -rf "$SHIM"
exit $rc
