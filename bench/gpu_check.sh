#!/usr/bin/env bash
# The one-GPU check: run on a machine with one CUDA GPU, from the repository root; about 10 minutes.
#
#   bash bench/gpu_check.sh
#
# 1. installs with VLLM_EXTRA=gpu (the CUDA `vllm` package) into .venv-gpu and prepares the embedded model;
# 2. serves it on the GPU through the router (`appliance up --without coordinator --without console`) and chats;
# 3. trains 20 bf16 steps with ZeRO-2 and with ZeRO-3 (`appliance train`);
# 4. runs one federation round with two silos training on the GPU (coordinator + 2 `appliance silo join`).
# Prints one line per check (PASS/FAIL, seconds, a figure) and exits non-zero if any failed. Logs: $WORK/*.log.
# Without CUDA it stops at once saying so.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-.venv-gpu}
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
export APPLIANCE_HOME=$WORK/home TOKENIZERS_PARALLELISM=false
FAILED=0
PIDS=()

cleanup() { for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

line() { printf '%-34s %-4s %6ss  %s\n' "$1" "$2" "$3" "$4"; [ "$2" = PASS ] || FAILED=1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi finds none); this check needs one. Nothing was run." >&2
  exit 2
fi
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)

t0=$SECONDS
if make -s install VLLM_EXTRA=gpu VENV="$VENV" >"$WORK/install.log" 2>&1 \
   && "$VENV/bin/python" -c 'import torch, vllm; assert torch.cuda.is_available()' >>"$WORK/install.log" 2>&1 \
   && "$VENV/bin/appliance" model prepare >>"$WORK/install.log" 2>&1; then
  line "install (VLLM_EXTRA=gpu)" PASS $((SECONDS - t0)) "$GPU"
else
  line "install (VLLM_EXTRA=gpu)" FAIL $((SECONDS - t0)) "see $WORK/install.log"; exit 1
fi
APP="$VENV/bin/appliance"
PY="$VENV/bin/python"

# --- serving on the GPU through the router
t0=$SECONDS
RPORT=$(free_port); WPORT=$(free_port)
APPLIANCE_WORKER__DEVICE=cuda APPLIANCE_WORKER__BASE_PORT=$WPORT APPLIANCE_WORKER__GPU_MEMORY_UTILIZATION=0.3 \
APPLIANCE_SERVE__PORT=$RPORT setsid "$APP" up --without coordinator --without console >"$WORK/up.log" 2>&1 &
PIDS+=($!)
answer=""
for _ in $(seq 1 120); do
  if grep -q "is up" "$WORK/up.log" 2>/dev/null; then
    answer=$(curl -s "http://127.0.0.1:$RPORT/v1/chat/completions" -H 'Content-Type: application/json' \
      -d '{"model": "smollm2-135m-instruct", "max_tokens": 16, "messages": [{"role": "user", "content": "Name a river."}]}' \
      | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"].strip()[:40])' 2>/dev/null)
    break
  fi
  sleep 2
done
if [ -n "$answer" ]; then line "serve on GPU via router" PASS $((SECONDS - t0)) "answer: $answer"
else line "serve on GPU via router" FAIL $((SECONDS - t0)) "see $WORK/up.log"; fi
cleanup; PIDS=()

# --- training: 20 bf16 steps, ZeRO-2 and ZeRO-3
"$PY" - "$WORK/train.jsonl" <<'PY'
import json, sys
rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{i} plus {i} is {2*i}."}]} for i in range(200)]
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
for stage in 2 3; do
  t0=$SECONDS
  if APPLIANCE_TRAIN__PRECISION=bf16 "$APP" train --data "$WORK/train.jsonl" --zero-stage $stage --max-steps 20 \
       --batch-size 8 --max-seq-len 256 --output gpu-z$stage >"$WORK/train-z$stage.log" 2>&1; then
    line "train 20 bf16 steps ZeRO-$stage" PASS $((SECONDS - t0)) "$(grep -o 'train_loss [0-9.]*.*tokens/s' "$WORK/train-z$stage.log" | tail -1)"
  else
    line "train 20 bf16 steps ZeRO-$stage" FAIL $((SECONDS - t0)) "see $WORK/train-z$stage.log"
  fi
done

# --- one federation round, two silos on the GPU
t0=$SECONDS
CPORT=$(free_port)
"$PY" - "$WORK" <<'PY'
import json, sys
from fedllm.federation.demo.data import generate
data = generate()
for org in ("northbridge", "redwood"):
    open(f"{sys.argv[1]}/{org}.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in data[org]["train"]))
PY
APPLIANCE_FEDERATION__STATUS_PORT=$(free_port) setsid "$APP" coordinator start --plaintext --rounds 1 --min-silos 2 \
  --local-steps 10 --port "$CPORT" --round-deadline 300 >"$WORK/coordinator.log" 2>&1 &
COORD=$!; PIDS+=($COORD)
sleep 5
for org in northbridge redwood; do
  APPLIANCE_TRAIN__PRECISION=bf16 setsid "$APP" silo join --plaintext --coordinator "tcp://127.0.0.1:$CPORT" \
    --data "$WORK/$org.jsonl" --name "$org" >"$WORK/silo-$org.log" 2>&1 &
  PIDS+=($!)
done
if timeout 420 tail --pid=$COORD -f /dev/null && grep -q "done after 1 round" "$WORK/coordinator.log"; then
  line "federation round, 2 GPU silos" PASS $((SECONDS - t0)) "$(grep -o 'run .*' "$WORK/coordinator.log" | tail -1)"
else
  line "federation round, 2 GPU silos" FAIL $((SECONDS - t0)) "see $WORK/coordinator.log, $WORK/silo-*.log"
fi
exit $FAILED
