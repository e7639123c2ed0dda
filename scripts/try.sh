#!/usr/bin/env bash
# Gantry's main job on this machine: installs what is missing, fetches the real models, builds
# the `gantry` binary, shows what it knows about them and which models suit a need, and runs
# them with Gantry's engine.
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
