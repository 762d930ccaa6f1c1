#!/usr/bin/env bash
# Copies the shared libraries attnscope's programs need (their whole ldd closure, and that of the
# dlopen'ed SentencePiece shim) into DEST, except the C and C++ runtimes every Debian 12 base has.
# The CPU image's runtime stage then holds these files and nothing else from the build: Debian's
# libtorch1.13 package depends on some 400 packages (OpenCV, Qt, GDAL...) that the programs never
# load.
#   deploy/bundle-libs.sh DEST BINARY...
set -euo pipefail
DEST="$1"
shift
mkdir -p "$DEST"
# The base image's own runtime: glibc, libstdc++, libgcc.
skip='^(ld-linux-x86-64|libc|libm|libpthread|libdl|librt|libutil|libresolv|libstdc\+\+|libgcc_s)\.so'
n=0
for lib in $(ldd "$@" | awk '/=> \//{print $3}' | sort -u); do
  base=$(basename "$lib")
  if [[ "$base" =~ $skip ]]; then continue; fi
  cp -L "$lib" "$DEST/$base"
  n=$((n + 1))
done
echo "bundle-libs: $n libraries ($(du -sh "$DEST" | cut -f1)) for $*"
