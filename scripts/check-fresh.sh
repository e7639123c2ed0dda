#!/usr/bin/env bash
# Proves the README's two commands work on a fresh machine: removes what scripts/setup.sh
# installs, then runs both commands from a clean clone and checks that they pass.
#
#   1. purges the apt packages setup.sh installs (`scripts/setup.sh --apt-packages`: protoc and
#      the well-known .proto files, etcd, prometheus, chromium) and what they pulled in;
#   2. deletes the Python environments (.venv-*) and the models (models/) of this checkout;
#   3. clones this repository's committed HEAD into a scratch folder, with a Cargo home of its
#      own (no registry cache, no build), so nothing built or downloaded before is reused;
#   4. runs `scripts/try.sh`, then `scripts/test.sh` there, timing each; fails if either fails.
#
# It changes the machine (it must run as root or with sudo) and takes as long as a first build
# plus the whole test suite (about 45 minutes on 2 cores). Base packages of a Debian image
# with the Rust toolchain (gcc, python3, openssl, nodejs/npm) are left alone: setup.sh checks
# them and installs them only when missing.
#
#   scripts/check-fresh.sh             # the whole check
#   scripts/check-fresh.sh --keep      # keep the scratch clone (its path is printed)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
keep=0
[[ "${1:-}" == --keep ]] && keep=1
say() { printf 'check-fresh: %s\n' "$*" >&2; }
sudo_if_needed() {
  if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]]; then
  say "note: uncommitted changes are not checked; the clone takes the committed HEAD ($(git -C "$root" rev-parse --short HEAD))"
fi

# 1. The apt packages.
mapfile -t packages < <("$root/scripts/setup.sh" --apt-packages)
installed=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' && installed+=("$p")
done
if ((${#installed[@]})); then
  say "purging ${installed[*]} (and what they pulled in)"
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq "${installed[@]}" >/dev/null
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get autoremove --purge -y -qq >/dev/null
else
  say "none of ${packages[*]} is installed"
fi
for tool in protoc etcd promtool chromium; do
  if command -v "$tool" >/dev/null 2>&1; then
    say "$tool is still on PATH ($(command -v "$tool")) after the purge: it did not come from apt; the check is not from a fresh state"
    exit 1
  fi
done
if [[ -e /usr/include/google/protobuf/descriptor.proto ]]; then
  say "the well-known .proto files are still in /usr/include after the purge"
  exit 1
fi

# 2. This checkout's environments and models.
say "deleting $root/.venv-* and $root/models"
rm -rf "$root"/.venv-* "$root/models"

# 3. A clean clone with its own Cargo home (the toolchain itself stays, as on a fresh machine).
scratch="$(mktemp -d /tmp/gantry-fresh.XXXXXX)"
[[ "$keep" -eq 1 ]] || trap 'rm -rf "$scratch"' EXIT
git clone --quiet "$root" "$scratch/gantry"
export CARGO_HOME="$scratch/cargo-home"
mkdir -p "$CARGO_HOME"
say "clean clone of $(git -C "$scratch/gantry" rev-parse --short HEAD) in $scratch/gantry, CARGO_HOME=$CARGO_HOME"

# 4. The two commands, timed.
run_timed() { # run_timed NAME COMMAND...
  local name="$1" start end
  shift
  say "running $name"
  start=$(date +%s)
  if ! (cd "$scratch/gantry" && "$@") >"$scratch/$name.log" 2>&1; then
    end=$(date +%s)
    tail -40 "$scratch/$name.log" >&2
    say "FAILED: $name after $((end - start)) s (log: $scratch/$name.log)"
    keep=1
    trap - EXIT
    exit 1
  fi
  end=$(date +%s)
  say "passed: $name in $((end - start)) s"
  timings+=("$name: $((end - start)) s")
}
timings=()
run_timed try scripts/try.sh
grep -q '^ready: ' "$scratch/try.log" || {
  say "scripts/try.sh passed but \`gantry up\` never said it was ready (log: $scratch/try.log)"
  exit 1
}
run_timed test scripts/test.sh
summary="$(grep -E '^test result:' "$scratch/test.log" | awk '{p+=$4; f+=$6; i+=$8} END {print p" passed, "f" failed, "i" ignored"}')"
say "fresh-machine check passed: ${timings[*]}; tests: $summary"
[[ "$keep" -eq 1 ]] && say "kept $scratch"
exit 0
