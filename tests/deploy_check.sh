#!/usr/bin/env bash
# What can be checked of the containers without a Docker engine: the compose file (both profiles)
# validates, every file the Dockerfile copies exists, its CPU stages run the same scripts CI runs,
# and the runtime packages it installs exist in Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "deploy_check: $*" >&2; exit 1; }

command -v docker-compose >/dev/null || fail "docker-compose not installed (deploy/install-deps.sh installs it)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r deploy "$tmp/deploy"
[ -f "$tmp/deploy/secrets/tokens" ] || cp deploy/secrets/tokens.example "$tmp/deploy/secrets/tokens"
docker-compose -f "$tmp/deploy/docker-compose.yml" config -q || fail "compose file invalid"
docker-compose -f "$tmp/deploy/docker-compose.yml" --profile scale-out config -q || fail "scale-out profile invalid"
docker-compose -f "$tmp/deploy/docker-compose.yml" --profile scale-out config --services | sort | tr '\n' ' ' \
  | grep -q "envoy replica server" || fail "expected services envoy, replica, server"

grep -q 'deploy/install-deps.sh --build' Dockerfile || fail "CPU build stage must use deploy/install-deps.sh --build"
grep -q 'bash deploy/build.sh' Dockerfile || fail "CPU build stage must use deploy/build.sh"
grep -q 'install-deps.sh --runtime' Dockerfile || fail "CPU runtime stage must use install-deps.sh --runtime"
grep -q '^USER attnscope' Dockerfile || fail "runtime must not run as root"
grep -q '^HEALTHCHECK' Dockerfile || fail "HEALTHCHECK missing"
for src in $(grep -E '^COPY [^-]' Dockerfile | awk '{print $2}'); do
  [ "$src" = "." ] || [ -e "$src" ] || fail "Dockerfile copies missing $src"
done
# Runtime packages of the CPU image exist in this distribution.
runtime=$(sed -n '/^RUNTIME=(/,/^)/p' deploy/install-deps.sh | grep -v -e 'RUNTIME=(' -e '^)' | tr -s ' \n' ' ')
for p in $runtime; do
  apt-cache show "$p" >/dev/null 2>&1 || fail "runtime package $p is not in the package lists"
done
# The envoy configuration parses as YAML and routes to the replica service.
/usr/bin/python3 - <<'PY' || fail "envoy.yaml"
import re
text = open("deploy/envoy.yaml").read()
assert "grpc_health_check" in text and re.search(r"address: replica, port_value: 50051", text)
PY
echo "deploy_check: ok (compose validated; Dockerfile stages use the CI scripts; images not built: no Docker engine here)"
