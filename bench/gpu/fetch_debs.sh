#!/usr/bin/env bash
# Downloads the Debian 12 packages the GPU build carries (gRPC, protobuf, Abseil, spdlog, fmt,
# sentencepiece, PCRE2, utf8proc, cpp-httplib, GoogleTest and their libraries) into .gpu_debs/.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu_debs
cd .gpu_debs
apt-get download libgrpc++-dev libgrpc++1.51 libgrpc29 libgrpc-dev protobuf-compiler protobuf-compiler-grpc \
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 libprotoc32 libprotoc-dev libabsl-dev libabsl20220623 \
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libsentencepiece-dev libsentencepiece0 nlohmann-json3-dev \
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libutf8proc-dev libutf8proc2 \
  libcpp-httplib-dev libcpp-httplib0.11 libgtest-dev libssl-dev libssl3 zlib1g-dev libc-ares-dev libc-ares2 \
  libre2-dev libre2-9 libbrotli1 libbrotli-dev
du -sh .
