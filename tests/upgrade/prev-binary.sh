#!/usr/bin/env bash
# The previous release's `synod` (named with its commit in
# tests/upgrade/previous-release), built once from that commit's source and
# cached under ~/.cache/synod/prev/<name>-<commit>/; prints its path. The
# rolling-upgrade test (tests/cluster/upgrade.rs) runs a cluster of it and
# upgrades it to this build node by node.
set -euo pipefail
cd "$(dirname "$0")/../.."
read -r name commit < <(grep -v '^#' tests/upgrade/previous-release | grep -v '^[[:space:]]*$' | head -n 1)
[ -n "${name:-}" ] && [ -n "${commit:-}" ] || {
    echo "tests/upgrade: tests/upgrade/previous-release names no release" >&2; exit 1; }
cache="$HOME/.cache/synod/prev/$name-$commit"
if [ ! -x "$cache/synod" ]; then
    if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
        echo "tests/upgrade: $name ($commit) is not in this clone (a shallow clone?); fetch the full history and run again" >&2
        exit 1
    fi
    echo "building $name's synod (once; cached in $cache)" >&2
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    git archive "$commit" | tar -x -C "$src"
    # Its own target dir (its dependency set differs), without debug info.
    CARGO_TARGET_DIR="$HOME/.cache/synod/prev-target" CARGO_PROFILE_DEV_DEBUG=0 \
        cargo build --locked -q -p synod --bin synod --manifest-path "$src/Cargo.toml" >&2
    mkdir -p "$cache"
    cp "$HOME/.cache/synod/prev-target/debug/synod" "$cache/synod.tmp"
    mv "$cache/synod.tmp" "$cache/synod"
    # Only the binary is kept.
    rm -rf "$HOME/.cache/synod/prev-target"
fi
echo "$cache/synod"
