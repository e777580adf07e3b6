#!/usr/bin/env bash
# evl on a machine with a GPU, checked end to end in under 10 minutes: the environment (nvidia-smi, torch,
# CUDA), the device-sensitive tests on CUDA, the decoder's kernel count, a short synth -> train -> eval ->
# predict -> explain -> extract -> train-from-features run through the command line, two-process NCCL
# training when there are two GPUs, and `evl bench` at GPU batch sizes.
#
#   bash benchmarks/gpu_check.sh [SUMMARY_JSON]
#
# The summary goes to SUMMARY_JSON, else $OUT/gpu_check.json, else gpu_check_out/gpu_check.json: per step
# pass/fail/timeout/skip, seconds, the command, its JSON result when it prints one, and the end of its
# output. It is rewritten after every step, so a check cut short still leaves one. Beside it:
# gpu_check.log (every step's whole output) and bench.json. Every step has its own timeout and a failed
# step does not stop the others; the exit status is 1 when any step failed.
#
# Environment: DEVICE=cpu replays the check on the CPU at tiny sizes (to try the script itself, minutes on
# two cores); BUDGET_S (default 540) bounds the whole check, later steps get what is left; PYTHON picks the
# interpreter (default python3); WHEELS names a folder of wheels to install missing dependencies from, for
# a machine that cannot reach a package index.
set -u

DEVICE=${DEVICE:-cuda}
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python

SUMMARY=${1:-${OUT:+$OUT/gpu_check.json}}
SUMMARY=${SUMMARY:-gpu_check_out/gpu_check.json}
case $SUMMARY in /*) ;; *) SUMMARY=$PWD/$SUMMARY ;; esac
OUT_DIR=$(dirname "$SUMMARY")
mkdir -p "$OUT_DIR"
ALL_LOG=$OUT_DIR/gpu_check.log
BENCH_JSON=$OUT_DIR/bench.json
: >"$ALL_LOG"
rm -f "$BENCH_JSON"

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
W=$(mktemp -d "${TMPDIR:-/tmp}/evl_gpu_check.XXXXXX")
mkdir -p "$W/logs"
: >"$W/steps.tsv"
trap 'rm -rf "$W"' EXIT
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DEVICE
START_EPOCH=$(date +%s)

# Sizes: real ones on a GPU; on the CPU the smallest that still run every code path.
if [ "$DEVICE" = cpu ]; then
  SYNTH=(--train-per-class 2 --val-per-class 1 --num-frames 10 --size 48 --workers 2)
  MODEL_ARGS=(--backbone random:ViT-T/16@112 --num-frames 4 --frame-stride 2 --decoder-layers 2)
  TRAIN_ARGS=(--steps 3 --batch-size 4 --eval-every 3 --save-every 3 --num-workers 1)
  DDP_ARGS=(--steps 2 --batch-size 4 --eval-every 2 --save-every 2 --num-workers 0)
  EXTRACT_BATCH=2
  KERNEL_ARGS=(--model evl-t16-112 --batch-size 2)
  BENCH_ARGS=(--model evl-t16-112 --batch-sizes 1 2 --open-batch-size 1 --infer-batch-size 2
    --cached-batch-size 2 --epoch-batch-size 8 --repeats 1 --no-dataloader)
else
  # B/16 shapes at 224 px (the 112 px videos are resized as any video is), 8 frames.
  SYNTH=(--train-per-class 8 --val-per-class 2 --num-frames 24 --size 112 --workers 8)
  MODEL_ARGS=(--backbone random:ViT-B/16 --num-frames 8 --frame-stride 2 --decoder-layers 4)
  TRAIN_ARGS=(--steps 20 --batch-size 16 --eval-every 20 --save-every 20 --num-workers 6)
  DDP_ARGS=(--steps 10 --batch-size 16 --eval-every 10 --save-every 10 --num-workers 3)
  EXTRACT_BATCH=8
  KERNEL_ARGS=(--model evl-b16 --batch-size 32)
  # The open-backbone step at batch 8, so that the frozen/open ratio compares equal batches.
  BENCH_ARGS=(--model evl-b16 --batch-sizes 1 8 32 --open-batch-size 8 --infer-batch-size 32
    --cached-batch-size 16 --repeats 3 --no-dataloader)
fi

# ---------------------------------------------------------------------------------------------- summary

cat >"$W/summarize.py" <<'PY'
"""Rewrite the JSON summary from steps.tsv and the step logs (called after every step)."""
import json
import os
import socket
import sys
import time

work, summary = sys.argv[1], sys.argv[2]


def find_errors(value, where=""):
    """("where", message) of every "error" entry in a JSON result."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "error" and isinstance(item, str):
                yield f"{where or '<root>'}: {item}"[:500]
            else:
                yield from find_errors(item, f"{where}.{key}".lstrip("."))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from find_errors(item, f"{where}[{i}]")


TAIL_LINES, TAIL_CHARS = 25, 3000
steps, counts = [], {}
with open(os.path.join(work, "steps.tsv")) as f:
    for line in f:
        name, status, rc, seconds, limit, result_file, command = line.rstrip("\n").split("\t", 6)
        log = os.path.join(work, "logs", name + ".log")
        lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
        step = {"name": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                "seconds": float(seconds), "limit_s": int(limit) if limit.isdigit() else None,
                "command": command}
        result = None
        if result_file and os.path.exists(result_file):
            try:
                result = json.load(open(result_file))
            except ValueError:
                pass
        for text in reversed(lines if result is None else []):  # the last JSON object printed, if any
            text = text.strip()
            if text.startswith("{") and text.endswith("}"):
                try:
                    result = json.loads(text)
                    break
                except ValueError:
                    pass
        if result is not None:
            step["result"] = result
            # `evl bench` reports a failed measurement in its JSON and still exits 0: the step failed.
            errors = list(find_errors(result))
            if errors and status == "pass":
                status = step["status"] = "fail"
            if errors:
                step["errors"] = errors
        step["tail"] = "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]
        steps.append(step)
        counts[status] = counts.get(status, 0) + 1
start = int(os.environ["START_EPOCH"])
report = {
    "device": os.environ["DEVICE"],
    "host": socket.gethostname(),
    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
    "elapsed_s": round(time.time() - start, 1),
    "budget_s": int(os.environ["BUDGET_S"]),
    "complete": os.environ.get("COMPLETE") == "1",
    "counts": counts,
    "steps": steps,
}
tmp = summary + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
os.replace(tmp, summary)
PY

summarize() {
  START_EPOCH=$START_EPOCH BUDGET_S=$BUDGET_S COMPLETE=${1:-0} \
    "$PY" "$W/summarize.py" "$W" "$SUMMARY" || echo "(summary not written: $PY failed)"
}

record() {  # record NAME STATUS RC SECONDS LIMIT RESULT_FILE COMMAND
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$W/steps.tsv"
  printf '%-16s %-8s %5ss  rc=%s\n' "$1" "$2" "$4" "$3"
  summarize
}

skip() {  # skip NAME REASON
  echo "$2" >"$W/logs/$1.log"
  printf '=== %s: skipped: %s\n' "$1" "$2" >>"$ALL_LOG"
  record "$1" skip - 0 - "" "$2"
}

# step NAME LIMIT_S [RESULT_FILE=PATH] CMD...: run CMD under its own timeout, capped by what is left of
# BUDGET_S; its output goes to the step's log and gpu_check.log.
step() {
  local name=$1 limit=$2 result_file="" log=$W/logs/$1.log left t0 rc status
  shift 2
  case ${1:-} in RESULT_FILE=*) result_file=${1#RESULT_FILE=}; shift ;; esac
  left=$((BUDGET_S - ($(date +%s) - START_EPOCH) - 20))  # 20 s: the kill grace and the last summary
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    skip "$name" "no time left in BUDGET_S=$BUDGET_S"
    return 1
  fi
  printf '=== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$ALL_LOG"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  cat "$log" >>"$ALL_LOG"
  case $rc in 0) status=pass ;; 124 | 137) status=timeout ;; *) status=fail ;; esac
  record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
    "$limit" "$result_file" "$*"
  return "$rc"
}

# ------------------------------------------------------------------------------------- (a) environment

# Dependencies only when evl (with its video stack) does not import: a machine image's own torch (a CUDA
# build) satisfies evl's requirement and stays; `make install` would pin the CPU wheel instead.
cat >"$W/install.sh" <<'SH'
"$PY" -c 'import torch; print("torch before install:", torch.__version__, "CUDA", torch.version.cuda)'
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e . && exit 0
fi
"$PY" -m pip install --retries 1 --timeout 20 -e . && exit 0
echo "no package index reachable: installing evl alone; missing dependencies are listed by the env step"
"$PY" -m pip install --no-deps --no-build-isolation -e .
exit 1
SH
if "$PY" -c 'import evl.engine.train' >/dev/null 2>&1; then
  skip install "evl imports: $("$PY" -c 'import evl; print(evl.__file__)' 2>&1)"
else
  step install 150 env PY="$PY" bash "$W/install.sh"
fi

cat >"$W/env.py" <<'PY'
"""What this machine runs evl with, as one JSON line; fails without evl, or without CUDA when DEVICE=cuda."""
import importlib
import json
import os
import sys

info = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}, "missing": {}}
try:
    import torch

    info |= {"torch": torch.__version__, "torch_cuda_build": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "cuda_devices": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        info["gpus"] = [{"name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1)} for p in props]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as err:
    info["missing"]["torch"] = f"{type(err).__name__}: {err}"
for name in ("evl", "av", "kornia", "numpy", "safetensors", "yaml", "tqdm", "matplotlib", "tensorboard",
             "pytest", "transformers"):
    try:
        module = importlib.import_module(name)
        info["modules"][name] = getattr(module, "__version__", "?")
    except Exception as err:
        info["missing"][name] = f"{type(err).__name__}: {err}"
if "evl" in info["modules"]:
    info["evl_file"] = importlib.import_module("evl").__file__
print(json.dumps(info))
usable = "evl" in info["modules"] and "av" in info["modules"]
sys.exit(0 if usable and (os.environ["DEVICE"] != "cuda" or info.get("cuda_available")) else 1)
PY
cat >"$W/env.sh" <<'SH'
rc=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi || rc=1
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || rc=1
  nvidia-smi -L
elif [ "$DEVICE" != cpu ]; then
  echo "nvidia-smi: not found"; rc=1
fi
"$PY" "$ENV_PY" || rc=1
exit "$rc"
SH
step env 60 env PY="$PY" ENV_PY="$W/env.py" bash "$W/env.sh"
NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')

# ------------------------------------------------------------------------------- (b) the tests on CUDA

TESTS=()
for f in tests/test_on_device.py tests/test_precision.py tests/test_formulation.py; do
  [ -f "$f" ] && TESTS+=("$f")
done
step pytest 180 env EVL_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"

# --------------------------------------------------------------------------------- (c) the kernel count

if [ -f benchmarks/kernel_count.py ]; then
  step kernel_count 90 "$PY" benchmarks/kernel_count.py "${KERNEL_ARGS[@]}"
else
  skip kernel_count "benchmarks/kernel_count.py is not in this tree"
fi

# -------------------------------------- (e) synth -> train -> eval -> predict -> extract, the command line

D=$W/data
EVL=("$PY" -m evl)  # the `evl` command, whether or not its script is on PATH
DATA=(--data-root "$D" --train-list "$D/train.txt" --val-list "$D/val.txt" --classes "$D/classes.txt")
COMMON=("${DATA[@]}" "${MODEL_ARGS[@]}" --set data.rand_augment=null --no-flip --quiet)
step synth 60 "${EVL[@]}" synth "$D" --task motion "${SYNTH[@]}"
# The default precision: bfloat16 decoder autocast on GPUs that compute it, float32 on the CPU.
step train 120 "${EVL[@]}" train "${COMMON[@]}" "${TRAIN_ARGS[@]}" --device "$DEVICE" --output-dir "$W/run"
step eval 60 RESULT_FILE="$W/metrics.json" "${EVL[@]}" eval "$W/run" --device "$DEVICE" --batch-size 8 \
  --output "$W/metrics.json" --quiet
VIDEO=$D/$(head -n 1 "$D/val.txt" 2>/dev/null | cut -d ' ' -f 1)
step predict 60 "${EVL[@]}" predict "$W/run" "$VIDEO" --device "$DEVICE" --topk 3 --json
step explain 60 "${EVL[@]}" explain "$W/run" "$VIDEO" --device "$DEVICE" --out "$W/explained" --dpi 40
step extract 90 "${EVL[@]}" extract "${DATA[@]}" "${MODEL_ARGS[@]}" --num-workers 2 --device "$DEVICE" \
  --batch-size "$EXTRACT_BATCH" --output "$W/cache" --quiet
step train_features 90 "${EVL[@]}" train "${COMMON[@]}" "${TRAIN_ARGS[@]}" --features "$W/cache" \
  --device "$DEVICE" --output-dir "$W/run_features"

# ------------------------------------------------------------------ (f) two processes: NCCL (gloo on CPU)

if [ "$DEVICE" = cpu ] || [ "$NUM_GPUS" -ge 2 ]; then
  step ddp_train 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m evl train \
    "${COMMON[@]}" "${DDP_ARGS[@]}" --device "$DEVICE" --output-dir "$W/run_ddp"
else
  skip ddp_train "nvidia-smi -L lists $NUM_GPUS GPU(s); two-process NCCL training needs two"
fi

# ----------------------------------------------------------- (d) the benchmark: last, it takes what is left

step bench 300 RESULT_FILE="$BENCH_JSON" "${EVL[@]}" bench "${BENCH_ARGS[@]}" --device "$DEVICE" \
  --output "$BENCH_JSON"

summarize 1
echo "summary: $SUMMARY (whole output: $ALL_LOG)"
# The summary's verdicts, not the exit codes alone (a bench measurement can fail inside a passing command).
"$PY" - "$SUMMARY" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
for step in report["steps"]:
    print(f"{step['name']:<16} {step['status']:<8} {step['seconds']:6.1f}s", *step.get("errors", [])[:3], sep="  ")
sys.exit(1 if report["counts"].get("fail") or report["counts"].get("timeout") else 0)
PY
