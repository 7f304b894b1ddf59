#!/usr/bin/env bash
# Installs a Rust compiler that can build Synod plugins for wasm32-unknown-unknown
# on a machine whose rustup cannot download the wasm32 standard library.
#
# Where `rustup target add wasm32-unknown-unknown` works, you do not need this:
# `synod plugin build` uses the rustup target whenever it is installed.
#
# Otherwise this unpacks Debian's rustc (which ships the standard library's
# source) into a private folder, without installing the packages system-wide
# (they conflict with rustup), and `synod plugin build` compiles std from
# source with it (-Zbuild-std). Idempotent: a complete install is left alone.
#
#   SYNOD_WASM_RUST   target folder (default: $HOME/.cache/synod-wasm-rust)
set -euo pipefail

dest="${SYNOD_WASM_RUST:-$HOME/.cache/synod-wasm-rust}"
packages=(rustc-web libstd-rust-web-1.96 libstd-rust-web-dev rust-web-src libllvm22)

if [ -x "$dest/usr/bin/rustc" ] && [ -f "$dest/.complete" ]; then
    echo "wasm toolchain: already installed in $dest"
    exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    echo "error: no apt-get/dpkg here; install the target with 'rustup target add wasm32-unknown-unknown' instead" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo=sudo; fi

# Package lists may be missing on a fresh machine; apt-get download needs them.
if ! (cd "$work" && apt-get download "${packages[@]}" >/dev/null 2>&1); then
    $sudo apt-get update -qq
    (cd "$work" && apt-get download "${packages[@]}")
fi

rm -rf "$dest"
mkdir -p "$dest"
for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$dest"
done
touch "$dest/.complete"
libs="$dest/usr/lib/$(uname -m)-linux-gnu:$dest/usr/lib:$dest/usr/lib/llvm-22/lib"
echo "wasm toolchain: installed $(LD_LIBRARY_PATH="$libs" "$dest/usr/bin/rustc" --version 2>/dev/null || echo rustc) in $dest"
