#!/usr/bin/env bash
# Builds the CPU image from the Dockerfile with podman (no Docker engine needed) and runs its smoke
# stage (deploy/smoke.sh inside the image: no compiler or -dev package, a server, its health, a
# capture, the file loaded, as the non-root user); prints the image's size and the build's time.
# The Debian 12 base image comes from debootstrap (the machine's own Debian mirror, read from its
# apt sources) and is kept between runs; podman's layer cache too.
#   bash deploy/image-check.sh        (.ci/run and the test suite's image_check entry run it)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${ATTNSCOPE_BASE_IMAGE:-localhost/attnscope-debian:12}"
TAG="${ATTNSCOPE_IMAGE_TAG:-localhost/attnscope:cpu}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
fail() { echo "image-check: $*" >&2; exit 1; }

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (deploy/install-deps.sh installs it)"
done

mirror() {  # the first Debian archive the machine's apt sources name
  local m=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    m=$(grep -h -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(grep -E '^deb ' /etc/apt/sources.list | grep -v security | awk '{print $2}' | head -1)
  fi
  [ -n "$m" ] || fail "no Debian mirror in the apt sources"
  echo "$m"
}

START=$(date +%s)
if ! $SUDO podman image exists "$BASE"; then
  ROOTFS=$(mktemp -d)
  trap '$SUDO rm -rf "$ROOTFS"' EXIT
  MIRROR=$(mirror)
  echo "image-check: debootstrap bookworm from $MIRROR"
  $SUDO debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" > "$ROOTFS.log" 2>&1 \
    || { tail -20 "$ROOTFS.log" >&2; fail "debootstrap failed"; }
  # The image's apt uses the same mirror.
  echo "deb $MIRROR bookworm main" | $SUDO tee "$ROOTFS/etc/apt/sources.list" >/dev/null
  $SUDO tar -C "$ROOTFS" -c . | $SUDO podman import - "$BASE" >/dev/null
  $SUDO rm -rf "$ROOTFS" "$ROOTFS.log"
  trap - EXIT
  echo "image-check: base image $BASE made in $(( $(date +%s) - START )) s"
else
  echo "image-check: base image $BASE (kept from an earlier run)"
fi

BUILD_START=$(date +%s)
# The smoke stage's RUN takes this value, so it runs every time (never from the layer cache).
RUN_ID="$(date +%s%N)-$$"
build() {
  $SUDO podman build --isolation chroot --build-arg DEBIAN_IMAGE="$BASE" -f Dockerfile "$@" .
}
set +e
build --target smoke -t "$TAG-smoke" --build-arg SMOKE_RUN="$RUN_ID" 2>&1 | tee /tmp/attnscope-image-check.log \
  | grep --line-buffered -E 'STEP [0-9]|^smoke:|^(Error|error)'
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || { tail -40 /tmp/attnscope-image-check.log >&2; fail "podman build --target smoke failed"; }
grep -q "^smoke: run $RUN_ID" /tmp/attnscope-image-check.log \
  || fail "the smoke stage did not run in this build (taken from the layer cache?)"
grep -q "^smoke: passed" /tmp/attnscope-image-check.log || fail "the smoke stage did not report success"
build --target cpu -t "$TAG" > /tmp/attnscope-image-build.log 2>&1 \
  || { tail -40 /tmp/attnscope-image-build.log >&2; fail "podman build --target cpu failed"; }
# The build stage tagged, so that its layers stay the next run's cache; stages of earlier runs go.
build --target cpu-build -t "$TAG-build" > /dev/null 2>&1 || true
$SUDO podman image prune -f > /dev/null 2>&1 || true
SIZE=$($SUDO podman image inspect "$TAG" --format '{{.Size}}')
echo "image-check: $TAG built and smoke-tested in $(( $(date +%s) - BUILD_START )) s" \
     "(base image included: $(( $(date +%s) - START )) s); size $(( SIZE / 1000000 )) MB"
grep -E '^smoke: ' /tmp/attnscope-image-check.log | sed 's/^/  /'
