#!/usr/bin/env bash
# cargo-deny over the dependency graph, as deny.toml says: known vulnerabilities, unmaintained
# and unsound crates (the RustSec advisory database), licences, duplicate versions and sources.
# The test command runs it. CI reaches package registries only, not GitHub, so the database is a
# snapshot kept in the repository (.ci/advisory-db.bundle, one commit of rustsec/advisory-db
# with its date); cargo-deny (pinned, built by scripts/setup.sh into .tools/cargo-deny) reads it
# offline.
#
#   scripts/check-deps.sh              # the check
#   scripts/check-deps.sh --refresh    # replace the snapshot with advisory-db's newest commit
#                                      # (needs git access to github.com), then check
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'check-deps: %s\n' "$*" >&2; }
bundle=.ci/advisory-db.bundle
deny=.tools/cargo-deny/bin/cargo-deny
# cargo-deny keeps each database in db-path under a name made from its URL (deny.toml).
db=target/advisory-dbs/advisory-db-3157b0e258782691

if [[ "${1:-}" == --refresh ]]; then
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  git clone --quiet --depth 1 https://github.com/rustsec/advisory-db "$scratch/upstream"
  commit="$(git -C "$scratch/upstream" rev-parse HEAD)"
  date="$(git -C "$scratch/upstream" log -1 --format=%cI)"
  git init --quiet -b main "$scratch/snapshot"
  git -C "$scratch/upstream" archive HEAD | tar -x -C "$scratch/snapshot"
  git -C "$scratch/snapshot" add -A
  GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" git -C "$scratch/snapshot" \
    -c user.name="RustSec advisory-db snapshot" -c user.email=snapshot@gantry.invalid \
    commit --quiet -m "RustSec advisory-db at $commit ($date), one commit"
  git -C "$scratch/snapshot" bundle create "$root/$bundle" main 2>/dev/null
  say "snapshot replaced: advisory-db $commit of $date"
fi

[[ -x "$deny" ]] || { say "$deny is missing: run scripts/setup.sh"; exit 1; }
# Every crate of the lock file, the CUDA build's too (deny.toml checks all features), so that
# cargo-deny's offline run finds their manifests.
cargo fetch --locked --quiet
rm -rf "$db"
mkdir -p "$(dirname "$db")"
git clone --quiet -b main "$bundle" "$db"
say "advisories as of $(git -C "$db" log -1 --format=%cs) ($(git -C "$db" log -1 --format=%s | sed 's/ (.*//'))"
"$deny" --offline --locked check
