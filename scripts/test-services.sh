#!/usr/bin/env bash
# Installs the Debian packages that only the test suite uses: a PostgreSQL 15 server (cluster
# mode), HAProxy (gRPC balancing), Prometheus and promtool (metrics and alert rules), and
# openCryptoki (a second, independent PKCS#11 module). The tests start every server they need
# themselves (private PostgreSQL clusters, pkcsslotd, haproxy, prometheus) and stop it after.
# Safe to run again.
set -euo pipefail
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15)
command -v haproxy >/dev/null || need+=(haproxy)
command -v promtool >/dev/null || need+=(prometheus)
command -v pkcsslotd >/dev/null || need+=(opencryptoki)
if ((${#need[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "test-services: installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi
echo "test-services: ready"
