#!/usr/bin/env bash
# Installs the Debian 12 packages attnscope needs. Idempotent.
#   install-deps.sh            build + tests (what CI and a developer need)
#   install-deps.sh --build    build only (the container's build stage)
set -euo pipefail

BUILD=(
  build-essential cmake pkg-config
  libtorch-dev libopenblas0-pthread
  libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev
  libsentencepiece-dev
  libabsl-dev libspdlog-dev libfmt-dev nlohmann-json3-dev libpcre2-dev libutf8proc-dev libcpp-httplib-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-numpy python3-grpcio python3-protobuf python3-matplotlib
)
TEST=(python3-venv podman debootstrap python3-pytest python3-jinja2 python3-pandas python3-xarray python3-tqdm python3-nbclient python3-ipykernel sentencepiece openssl chromium docker-compose bc clang clang-format libclang-rt-14-dev)
case "${1:-}" in
  --build) PACKAGES=("${BUILD[@]}") ;;
  "") PACKAGES=("${BUILD[@]}" "${TEST[@]}") ;;
  *) echo "usage: install-deps.sh [--build]" >&2; exit 2 ;;
esac

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y --no-install-recommends "${PACKAGES[@]}"
