#!/usr/bin/env bash
# Regenerates sdk/c/gen/ (the C bindings of the `command-handler` world) from
# wit/. The output is committed, so building a C plugin never needs
# wit-bindgen; run this only when wit/ changes, then commit gen/.
#
# The generator is pinned to the version the Rust SDK uses (wit-bindgen
# 0.60.0, sdk/Cargo.toml): both encode the same component type.
#
#   cargo install wit-bindgen-cli --version 0.60.0 --locked
#   sdk/c/gen.sh
set -euo pipefail

want="0.60.0"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wit="$here/../../wit"
bindgen="${WIT_BINDGEN:-wit-bindgen}"

have="$("$bindgen" --version 2>/dev/null | awk '{print $2}')" || true
if [ "$have" != "$want" ]; then
    echo "error: sdk/c/gen.sh needs wit-bindgen-cli $want (found: ${have:-none});" >&2
    echo "       cargo install wit-bindgen-cli --version $want --locked" >&2
    exit 1
fi

rm -rf "$here/gen"
"$bindgen" c "$wit" --world synod:plugin/command-handler --out-dir "$here/gen"
