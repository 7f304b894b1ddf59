#!/usr/bin/env bash
# The previous release's `synod` (the newest v* tag that is not HEAD),
# built once from that tag's source and cached under
# ~/.cache/synod/prev/<tag>/; prints its path. The rolling-upgrade test
# (tests/cluster/upgrade.rs) runs a cluster of it and upgrades it to this
# build node by node.
set -euo pipefail
cd "$(dirname "$0")/../.."
head=$(git rev-parse HEAD)
tag=""
for t in $(git tag --list 'v*' --sort=-v:refname); do
    if [ "$(git rev-list -n 1 "$t")" != "$head" ]; then tag=$t; break; fi
done
[ -n "$tag" ] || { echo "tests/upgrade: no earlier release tag (v*) in this clone" >&2; exit 1; }
cache="$HOME/.cache/synod/prev/$tag"
if [ ! -x "$cache/synod" ]; then
    echo "building $tag's synod (once; cached in $cache)" >&2
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    git archive "$tag" | tar -x -C "$src"
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
