#!/usr/bin/env bash
# Runs every test of Gantry: installs what is missing (scripts/setup.sh), fetches the real
# models, builds the workspace and runs all unit, integration and end-to-end tests, then
# checks the dependencies with cargo-deny (scripts/check-deps.sh), validates the Kubernetes manifests (CRD, Helm chart, examples) offline and builds the book
# (docs/) and checks its links, and compiles the CUDA build (clippy with --features cuda,nccl).
# Fails when any test fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh

# The test build takes about 3 GB under target/ (42 test binaries of ~40 MB, the dependencies'
# libraries); say so up front when the disk is short rather than failing in the linker.
free_kb="$(df -Pk "$root" | awk 'NR==2 {print $4}')"
if [[ -n "$free_kb" && "$free_kb" -lt 4000000 && ! -d "$root/target/debug/deps" ]]; then
  echo "test: warning: only $((free_kb / 1024)) MiB free under $root; the build needs about 3 GB" >&2
fi
# One build, no rebuilds: incremental caches would add ~1.8 GB to target/ for nothing.
export CARGO_INCREMENTAL=0
echo "test: building the workspace" >&2
cargo build --workspace --all-targets --locked
# The controller runs no model: it must not compile the engine (the tree is captured first, so
# grep -q stopping early cannot turn into a SIGPIPE that pipefail reads as "no match").
controller_deps="$(cargo tree -p gantry-controller -e normal --locked)"
if grep -Eq '\b(candle-core|tokenizers|minijinja)\b' <<<"$controller_deps"; then echo "test: gantry-controller depends on the engine's crates (candle, tokenizers, minijinja): it must not" >&2; exit 1; fi
echo "test: running the tests" >&2
cargo test --workspace --locked --no-fail-fast
echo "test: checking the dependencies (cargo-deny: advisories, licences, duplicates, sources)" >&2
scripts/check-deps.sh
echo "test: validating the Kubernetes manifests" >&2
scripts/validate-manifests.sh
echo "test: building the book and checking its links" >&2
scripts/check-docs.sh
# The GPU build compiles too, with no GPU: CUDA 13.0 and NCCL from pinned PyPI wheels
# (scripts/cuda-toolkit.sh), then clippy over the engine, the worker and the CLI with
# --features cuda,nccl (candle-kernels' nvcc build included), in a target dir of its own so the
# CPU build above is never rebuilt. GANTRY_SKIP_CUDA_BUILD=1 skips it (it needs ~850 MB of
# wheels and ~10 minutes on 2 cores).
if [[ "${GANTRY_SKIP_CUDA_BUILD:-0}" != 1 ]]; then
  echo "test: compiling the CUDA build (clippy --features cuda,nccl)" >&2
  eval "$(scripts/cuda-toolkit.sh)"
  CARGO_TARGET_DIR="$root/target/cuda" cargo clippy --locked -p gantry-engine -p gantry-worker -p gantry-cli \
    --features gantry-cli/nccl --all-targets -- -D warnings
fi
