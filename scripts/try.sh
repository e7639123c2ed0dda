#!/usr/bin/env bash
# Gantry's main job on this machine: installs what is missing, fetches the real models, builds
# the `gantry` binary, shows what it knows about them and which models suit a need, runs them
# with Gantry's engine, then starts a worker serving SmolLM2 and chats with it over gRPC.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh

cargo build --quiet --release --locked -p gantry-cli
gantry="$root/target/release/gantry"

run() { printf '\n$ gantry %s\n' "$*"; "$gantry" "$@"; }
run inspect models/SmolLM2-135M-Instruct.Q4_1.gguf --gpus 1x24GiB
run inspect models/gemma-3-270m-q4_k_m.gguf
run inspect meta-llama/Meta-Llama-3-70B-Instruct --gpus 4x48GiB
run select --task chat --latency realtime --gpus 1x24GiB
run generate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt "What is the capital of France?"
run generate --model models/gemma-3-270m-q4_k_m.gguf --prompt "The quick brown fox" --max-tokens 32

# A worker serving the real model on a free port, called by the Python gRPC client.
printf '\n$ gantry worker --listen 127.0.0.1:0 --model smollm2=models/SmolLM2-135M-Instruct.Q4_1.gguf\n'
log="$(mktemp)"
"$gantry" worker --listen 127.0.0.1:0 --model smollm2=models/SmolLM2-135M-Instruct.Q4_1.gguf >"$log" 2>&1 &
worker=$!
trap 'kill "$worker" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 600); do grep -q '^ready$' "$log" && break; kill -0 "$worker" 2>/dev/null || { cat "$log"; exit 1; }; sleep 0.1; done
grep -E 'listening on|^loaded|^ready' "$log"
addr="$(sed -n 's/.* listening on //p' "$log")"
printf '\n$ python scripts/clients/worker_chat.py %s smollm2 "What is the capital of France?"\n' "$addr"
.venv-clients/bin/python scripts/clients/worker_chat.py "$addr" smollm2 "What is the capital of France?"
