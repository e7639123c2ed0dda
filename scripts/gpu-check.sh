#!/usr/bin/env bash
# One prepared check of the GPU path, for a lent GPU machine (the `device` tool: 15 minutes in
# all per session, so everything is built beforehand and carried). Records in bench/results/:
#   gpu-check-<UTC>-inventory.txt   `gantry worker --print-gpus` (NVML's inventory), nvidia-smi
#   gpu-check-<UTC>.json            per real model on cuda:0 against the CPU runtime: logits at
#                                   64 positions, greedy tokens, prefill and decode tokens/s,
#                                   GPU memory after loading against the estimate's terms
#   gpu-check-<UTC>-tp.json         with two or more GPUs: the same on a tensor-parallel group
#                                   of every GPU the models' heads allow (cuda:0,cuda:1)
#
# Build here (with the CUDA toolkit of scripts/cuda-toolkit.sh), then carry target/gpu-check:
#   scripts/gpu-check.sh --build            # cargo build --release --features cuda,nccl …
#   scripts/gpu-check.sh                    # on the GPU machine: the checks above
#   scripts/gpu-check.sh --dry-run          # here, without a GPU: the same steps on the CPU
#                                           # build, Candle on the CPU as the device
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="$root/target/gpu-check"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$root/bench/results"
models=(models/SmolLM2-135M-Instruct.Q4_1.gguf models/gemma-3-270m-q4_k_m.gguf)
say() { printf 'gpu-check: %s\n' "$*" >&2; }

case "${1:-}" in
  --build)
    eval "$(scripts/cuda-toolkit.sh)"
    cargo build --release --locked -p gantry-cli --features cuda,nccl
    cargo build --release --locked -p gantry-engine --features cuda,nccl --example gpu_check
    mkdir -p "$bin"
    cp target/release/gantry target/release/examples/gpu_check "$bin/"
    say "built into $bin; carry target/gpu-check (and models/) to the GPU machine"
    exit 0
    ;;
  --dry-run)
    cargo build --release --locked -p gantry-cli
    cargo build --release --locked -p gantry-engine --example gpu_check
    mkdir -p "$bin"
    cp target/release/gantry target/release/examples/gpu_check "$bin/"
    devices=(candle-cpu)
    gpu_count=2
    stamp="$stamp-dry-run"
    ;;
  "")
    [ -x "$bin/gpu_check" ] || { say "no $bin/gpu_check: run scripts/gpu-check.sh --build first"; exit 1; }
    gpu_count="$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)"
    devices=(cuda:0)
    ;;
  *) say "usage: scripts/gpu-check.sh [--build | --dry-run]"; exit 2 ;;
esac
for m in "${models[@]}"; do
  [ -f "$m" ] || { say "$m is missing: run scripts/fetch-models.sh"; exit 1; }
done
mkdir -p "$out"

{
  echo "# gantry worker --print-gpus"
  "$bin/gantry" worker --print-gpus || true
  echo
  echo "# nvidia-smi"
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  echo
  echo "# nvidia-smi topo -m"
  nvidia-smi topo -m 2>&1 || true
} > "$out/gpu-check-$stamp-inventory.txt"
say "inventory: $out/gpu-check-$stamp-inventory.txt"

"$bin/gpu_check" --device "${devices[0]}" "${models[@]}" > "$out/gpu-check-$stamp.json"
say "one device: $out/gpu-check-$stamp.json"

if [ "$gpu_count" -ge 2 ]; then
  # Gemma 3 270M (4 heads, 1 KV head) splits 2 or 4 ways; SmolLM2 (9 heads) only 3 ways.
  n=$(( gpu_count >= 4 ? 4 : 2 ))
  if [ "${1:-}" = "--dry-run" ]; then group="candle-cpu×$n"; else group="$(seq -s, 0 $((n - 1)) | sed 's/\([0-9]\+\)/cuda:\1/g')"; fi
  "$bin/gpu_check" --device "$group" models/gemma-3-270m-q4_k_m.gguf > "$out/gpu-check-$stamp-tp.json"
  say "tensor-parallel over $group: $out/gpu-check-$stamp-tp.json"
fi
