#!/usr/bin/env bash
# Installs promtool (Debian package `prometheus`) so tests/unit/test_ops_prometheus.py can run
# `promtool check rules` and `promtool test rules`. Idempotent: does nothing when promtool is on PATH.
# The package also ships the Prometheus server and a service unit; we only want the CLI, so a service
# that the package's post-install step started is stopped again (containers usually forbid the start).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "promtool: $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "promtool is missing and this script needs root to apt-get install it;" >&2
    echo "run: sudo $0   (or install Debian's 'prometheus' package yourself)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends prometheus

# Stop the server that the package may have started: we need the CLI only.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus
elif [[ -x /etc/init.d/prometheus ]] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    /etc/init.d/prometheus stop
fi

echo "promtool: $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"
