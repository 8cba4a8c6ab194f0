#!/usr/bin/env bash
# Builds soffid-otp, installs it with its embedded defaults, starts guardd, and demonstrates a
# login: a demo user is enrolled and pamtester authenticates through the real module.
# Run as root on Debian 12. Idempotent: run it again to rebuild and restart.
#
#   scripts/install.sh --uninstall   stops guardd and removes everything this script created
#                                    (listed in /etc/soffid-otp/.installed as it went), the
#                                    tokens, key and demo user included; Debian packages that
#                                    scripts/deps.sh installed stay.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

manifest=/etc/soffid-otp/.installed
socket=/run/soffid-otp/guardd.sock

stop_guardd() {
  if [ -d /run/systemd/system ] && systemctl list-unit-files guardd.service >/dev/null 2>&1; then
    systemctl disable --now guardd.service 2>/dev/null || true
  fi
  if [ -f /run/soffid-otp/guardd.pid ]; then
    kill "$(cat /run/soffid-otp/guardd.pid)" 2>/dev/null || true
    for _ in $(seq 50); do [ -S "$socket" ] || break; sleep 0.1; done
  fi
}

if [ "${1:-}" = "--uninstall" ]; then
  [ -f "$manifest" ] || { echo "install.sh: nothing installed by this script ($manifest is missing)" >&2; exit 1; }
  echo "== stopping guardd"
  stop_guardd
  echo "== removing what install.sh created"
  tac "$manifest" | while read -r kind path; do
    case "$kind" in
      user) userdel --remove "$path" 2>/dev/null || true ;;
      dir) rm -rf -- "$path" ;;
      file) rm -f -- "$path" ;;
    esac
  done
  rm -f "$manifest"
  rmdir /etc/soffid-otp 2>/dev/null || true
  [ -d /run/systemd/system ] && systemctl daemon-reload
  echo "soffid-otp is uninstalled."
  exit 0
fi

# Records `kind path` in the manifest unless the path exists already (it was there before us).
created() {
  local kind=$1 path=$2
  case "$kind" in
    user) id "$path" >/dev/null 2>&1 && return 0 ;;
    *) [ -e "$path" ] && return 0 ;;
  esac
  install -d -m 0755 /etc/soffid-otp
  grep -qxF "$kind $path" "$manifest" 2>/dev/null || echo "$kind $path" >> "$manifest"
}

bash scripts/deps.sh build

echo "== building (release)"
cargo build --release --workspace
# The module on its own: built with the rest, cargo would give it the daemon's features of the
# crates they share (tonic's client and server in proto), which it does not use.
cargo build --release -p pam_soffid_otp

multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
pamdir=/usr/lib/$multiarch/security
echo "== installing"
created dir /etc/soffid-otp
for f in /usr/sbin/guardd /usr/bin/guardctl "$pamdir/pam_soffid_otp.so" \
  /etc/soffid-otp/guardd.toml /etc/soffid-otp/rules.toml /lib/systemd/system/guardd.service \
  /etc/pam.d/soffid-otp /var/log/guardd.log; do
  created file "$f"
done
# Made by guardd on its first start.
created dir /var/lib/soffid-otp
created file /etc/soffid-otp/guardd.key
created dir /run/soffid-otp
install -D -m 0755 target/release/guardd /usr/sbin/guardd
install -D -m 0755 target/release/guardctl /usr/bin/guardctl
install -D -m 0644 target/release/libpam_soffid_otp.so "$pamdir/pam_soffid_otp.so"
install -d -m 0755 /etc/soffid-otp
[ -e /etc/soffid-otp/guardd.toml ] || install -m 0644 packaging/guardd.toml /etc/soffid-otp/guardd.toml
[ -e /etc/soffid-otp/rules.toml ] || install -m 0644 packaging/rules.toml /etc/soffid-otp/rules.toml
guardd --check-policy /etc/soffid-otp/rules.toml
install -D -m 0644 packaging/guardd.service /lib/systemd/system/guardd.service
[ -e /etc/pam.d/soffid-otp ] || install -m 0644 packaging/pam.d-soffid-otp /etc/pam.d/soffid-otp

echo "== starting guardd"
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable guardd.service
  systemctl restart guardd.service
else
  # No systemd as PID 1 (containers, CI): run it in the background, logging to a file.
  stop_guardd
  install -d -m 0755 /run/soffid-otp
  # The log holds the audit trail: root and group adm only.
  touch /var/log/guardd.log
  chown root:adm /var/log/guardd.log
  chmod 0640 /var/log/guardd.log
  nohup /usr/sbin/guardd >>/var/log/guardd.log 2>&1 </dev/null &
  echo $! > /run/soffid-otp/guardd.pid
fi
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { echo "guardd did not start; see /var/log/guardd.log or journalctl -u guardd" >&2; exit 1; }
echo "guardd is listening on $socket"

echo "== demonstration: enrol user otpdemo and log in through pam_soffid_otp"
created user otpdemo
id otpdemo >/dev/null 2>&1 || useradd --create-home --shell /bin/bash otpdemo
guardctl list otpdemo | awk 'NR > 1 { print $1 }' | while read -r id; do
  guardctl delete otpdemo "$id" >/dev/null
done
enrolled=$(guardctl enroll otpdemo --label demo)
echo "$enrolled" | head -n 2
uri=$(echo "$enrolled" | grep '^otpauth://')
secret=$(echo "$uri" | sed -E 's/.*[?&]secret=([A-Z2-7]+).*/\1/')
# Confirm with the previous 30 s step's code (as a phone a little behind would show), log in with
# the current one: each step is accepted only once.
oathtool --totp -b --now "$(date -u -d '-30 seconds' '+%Y-%m-%d %H:%M:%S UTC')" "$secret" \
  | guardctl confirm otpdemo
# A sudo-like PAM stack under pam_wrapper (nothing in /etc/pam.d changes): the default rules ask
# enrolled users for an OTP on sudo.
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
echo "auth required $pamdir/pam_soffid_otp.so socket=$socket timeout=5" > "$demo/sudo"
echo "auth required pam_deny.so" > "$demo/other"
guardctl explain --user otpdemo --service sudo | tail -n 1
oathtool --totp -b "$secret" | LD_PRELOAD=libpam_wrapper.so PAM_WRAPPER=1 \
  PAM_WRAPPER_SERVICE_DIR="$demo" pamtester sudo otpdemo authenticate
guardctl list otpdemo
echo
echo "soffid-otp is installed and running. Next: enrol real users with"
echo "  guardctl enroll USER    and    guardctl confirm USER"
echo "and add 'auth required pam_soffid_otp.so' to the PAM services that should ask for a code;"
echo "/etc/soffid-otp/rules.toml decides when (guardctl explain shows why; guardctl reload applies)."
echo "To remove it all again: bash scripts/install.sh --uninstall"
