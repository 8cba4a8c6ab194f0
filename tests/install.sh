#!/usr/bin/env bash
# scripts/install.sh, then scripts/install.sh --uninstall, leaves the machine as it found it:
# the same files where install.sh writes, no demo user, no guardd running. Root only (skipped
# otherwise); run by tests/run.sh after the package test, which refuses to run beside an install.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "install test: skipped (needs root)"
  exit 0
fi
pamdir=/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)/security

snapshot() {
  {
    find /usr/sbin /usr/bin "$pamdir" /lib/systemd/system /var/lib /var/log /run /home /var/mail \
      -maxdepth 1 2>/dev/null
    find /etc -maxdepth 2 2>/dev/null
    getent passwd | cut -d: -f1
    getent group | cut -d: -f1
  } | sort
}

before=$(mktemp); after=$(mktemp)
trap 'rm -f "$before" "$after"' EXIT
snapshot > "$before"
echo "== install.sh"
bash scripts/install.sh > /tmp/soffid-otp-install-test.log 2>&1 || {
  tail -n 30 /tmp/soffid-otp-install-test.log; exit 1; }
[ -S /run/soffid-otp/guardd.sock ] || { echo "install.sh left no guardd running" >&2; exit 1; }
echo "== install.sh --uninstall"
bash scripts/install.sh --uninstall
snapshot > "$after"
if ! diff -u "$before" "$after"; then
  echo "install test: FAILED, the lines above differ after --uninstall" >&2
  exit 1
fi
if pgrep -x guardd >/dev/null && pgrep -a -x guardd | grep -q ' /usr/sbin/guardd'; then
  echo "install test: FAILED, /usr/sbin/guardd still runs" >&2
  exit 1
fi
rm -f /tmp/soffid-otp-install-test.log
echo "install test: OK"
