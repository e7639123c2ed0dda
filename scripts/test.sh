#!/usr/bin/env bash
# Runs every test of Gantry: installs what is missing (scripts/setup.sh), fetches the real
# models, builds the workspace and runs all unit, integration and end-to-end tests, then
# validates the Kubernetes manifests (CRD, Helm chart, examples) offline.
# Fails when any test fails.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh

echo "test: building the workspace" >&2
cargo build --workspace --all-targets --locked
echo "test: running the tests" >&2
cargo test --workspace --locked --no-fail-fast
echo "test: validating the Kubernetes manifests" >&2
scripts/validate-manifests.sh
