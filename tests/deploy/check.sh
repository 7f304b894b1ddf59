#!/usr/bin/env bash
# Checks of deploy/: the Dockerfile (hadolint, and the shape a node image
# needs) and the systemd unit (systemd's own verifier, and its sandbox's
# exposure score). There is no container daemon or systemd PID 1 here, so
# neither is run; both are checked by the tools that would refuse them.
#
#   tests/deploy/check.sh SYNOD_BINARY
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "$1")
fail() { echo "deploy check: $*" >&2; exit 1; }

# The Dockerfile: lint clean at every level, and what a node image needs.
hadolint --failure-threshold info deploy/Dockerfile || fail "hadolint refused deploy/Dockerfile"
df=deploy/Dockerfile
[ "$(grep -c '^FROM ' $df)" -ge 2 ] || fail "the Dockerfile is not multi-stage"
grep -q '^RUN cargo build --release --locked -p synod --bin synod' $df || fail "the build stage does not build synod --locked"
runtime=$(awk '/^FROM .* AS runtime/{on=1} on' $df)
user=$(echo "$runtime" | awk '/^USER /{print $2}' | tail -1)
[ -n "$user" ] && [ "${user%%:*}" != "0" ] && [ "${user%%:*}" != "root" ] || fail "the runtime stage runs as root"
echo "$runtime" | grep -q '^VOLUME \["/var/lib/synod"\]' || fail "the data dir is not a volume"
echo "$runtime" | grep -q '^COPY --from=build /src/target/release/synod /usr/local/bin/synod' || fail "the binary is not copied from the build stage"
for d in target/ plugins/target/ .git/; do
    grep -qx "$d" .dockerignore || fail ".dockerignore does not leave out $d"
done

# The unit: systemd's verifier says nothing (pointed at a real binary),
# and its sandbox scores at most 2.0 ("OK") on systemd's exposure scale.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/local/bin/synod#$bin#" deploy/synod.service > "$tmp/synod.service"
out=$(systemd-analyze verify "$tmp/synod.service" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
systemd-analyze security --offline=true --threshold=20 "$tmp/synod.service" > "$tmp/security" 2>&1 \
    || { cat "$tmp/security" >&2; fail "the unit's exposure is above 2.0"; }
grep -E '^(NoNewPrivileges|ProtectSystem=strict|ProtectHome|PrivateTmp|CapabilityBoundingSet)' deploy/synod.service \
    | wc -l | grep -qx 5 || fail "the unit lacks one of NoNewPrivileges, ProtectSystem=strict, ProtectHome, PrivateTmp, CapabilityBoundingSet"
# The unit's command line is one the binary accepts.
"$bin" node --help >/dev/null || fail "synod node --help failed"
echo "deploy: Dockerfile and systemd unit check out ($(tail -1 "$tmp/security" | sed 's/^→ //'))"
