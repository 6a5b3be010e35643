#!/usr/bin/env bash
# Debian packages the tests drive for real: Chromium (the MLflow UI test); SLURM with accounting (munge, MariaDB,
# slurmdbd) and PostgreSQL (the cluster tests, tests/services/stack.py starts them). Installed only where missing,
# and only as root with apt-get (CI); elsewhere it says what is missing and the tests that need it skip, saying so.
set -uo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
for pkg in slurm-wlm:slurmctld slurmd:slurmd slurmdbd:slurmdbd munge:munged mariadb-server:mariadbd; do
    command -v "${pkg#*:}" >/dev/null || [ -x "/usr/sbin/${pkg#*:}" ] || need+=("${pkg%%:*}")
done
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
    echo "services: all installed"; exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "services: not root with apt-get; missing ${need[*]}: the tests that need them will skip, saying so"
    exit 0
fi
echo "services: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "services: apt-get failed; the tests that need ${need[*]} will skip, saying so"
