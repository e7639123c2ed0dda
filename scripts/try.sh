#!/usr/bin/env bash
# Gantry's main job on this machine: installs what is missing, fetches the real models, builds
# the `gantry` binary, shows what it knows about them and which models suit a need, runs them
# with Gantry's engine, then starts Gantry (`gantry up`: a controller and a local worker serving
# SmolLM2) and chats with it through the controller from the CLI and the Python gRPC client.
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

# Gantry on this machine: `gantry up` starts a controller and a local worker in one process
# and deploys SmolLM2; `gantry chat` streams an answer through the controller, then the Python
# gRPC client does the same. Free ports and a scratch state file, so nothing here collides
# with a Gantry already running.
state="$(mktemp -d)"
log="$state/up.log"
printf '\n$ gantry up --listen 127.0.0.1:0 --http 127.0.0.1:0 --store %s/state.redb\n' "$state"
"$gantry" up --listen 127.0.0.1:0 --http 127.0.0.1:0 --store "$state/state.redb" >"$log" 2>"$state/up.err" &
up=$!
trap 'kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; rm -rf "$state"' EXIT
for _ in $(seq 1 600); do grep -q '^ready:' "$log" && break; kill -0 "$up" 2>/dev/null || { cat "$log" "$state/up.err"; exit 1; }; sleep 0.1; done
grep -q '^ready:' "$log" || { cat "$log" "$state/up.err"; exit 1; }
cat "$log"
addr="$(sed -n 's/^gantry controller listening on \([^ ]*\) .*/\1/p' "$log")"
run chat "What is the capital of France?" --controller "http://$addr"
run get deployments --controller "http://$addr"
run get workers --controller "http://$addr"
printf '\n$ python scripts/clients/chat.py %s "Name three primary colors."\n' "$addr"
.venv-clients/bin/python scripts/clients/chat.py "$addr" "Name three primary colors." "" 48
