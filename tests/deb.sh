#!/usr/bin/env bash
# Layer 5: the Debian package on this machine, as root. Builds it, installs it, runs guardd the
# way the unit does, logs a user in through the installed module, toggles the pam-auth-update
# profile, upgrades keeping the token, purges leaving nothing, and runs lintian.
# Leaves the machine as it found it (a previously installed soffid-otp is not expected).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "deb.sh: skipped (needs root)"; exit 0; }

fail() { echo "deb.sh: FAILED: $*" >&2; exit 1; }
if [ -e /usr/sbin/guardd ] && ! dpkg -S /usr/sbin/guardd >/dev/null 2>&1; then
  # scripts/install.sh put guardd here by hand: installing and purging the package would take
  # over and then delete that installation.
  echo "deb.sh: skipped: /usr/sbin/guardd was installed by scripts/install.sh, not by the package"
  exit 0
fi
user=otpdeb$$
scratch=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  dpkg --purge soffid-otp >/dev/null 2>&1 || true
  userdel -r "$user" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT

common_auth_before=$(sha256sum /etc/pam.d/common-auth)

echo "== build"
# cargo-deb prints the path of the package it wrote on its last line.
deb1=$scratch/first.deb deb2=$scratch/upgrade.deb
cp "$(bash packaging/build-deb.sh 2>/dev/null | tail -n1)" "$deb1"
cp "$(DEB_VERSION=0.1.1-1 bash packaging/build-deb.sh 2>/dev/null | tail -n1)" "$deb2"
echo "package: $(du -k "$deb1" | cut -f1) kB, installed size: $(dpkg-deb -f "$deb1" Installed-Size) kB"

echo "== lintian"
lintian --tag-display-limit 0 "$deb1" > "$scratch/lintian" 2>&1 || true
cat "$scratch/lintian"
! grep -q '^E:' "$scratch/lintian" || fail "lintian reports errors"

echo "== install"
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confdef --force-confold "$deb1" >/dev/null
for f in /usr/sbin/guardd /usr/bin/guardctl /usr/lib/x86_64-linux-gnu/security/pam_soffid_otp.so \
         /etc/soffid-otp/guardd.toml /etc/soffid-otp/rules.toml /lib/systemd/system/guardd.service \
         /usr/share/pam-configs/soffid-otp /usr/share/man/man8/guardd.8.gz \
         /usr/share/doc/soffid-otp/rules.md /usr/share/doc/soffid-otp/architecture.md \
         /usr/share/doc/soffid-otp/operating.md; do
  [ -e "$f" ] || fail "$f not installed"
done
[ "$(stat -c %a /etc/soffid-otp/guardd.key)" = 600 ] || fail "key file is not 0600"
[ "$(stat -c %a /var/lib/soffid-otp/guardd.db)" = 600 ] || fail "database is not 0600"
[ "$(sha256sum /etc/pam.d/common-auth)" = "$common_auth_before" ] || fail "install changed common-auth"
systemd-analyze verify /lib/systemd/system/guardd.service || fail "unit does not verify"
systemd-analyze security --offline=true /lib/systemd/system/guardd.service 2>/dev/null \
  | grep 'Overall exposure' || true
# The fleet drop-in as an admin installs it: systemd reads it without complaint, and it opens IP
# (AF_INET, AF_INET6) to an allow list while IPAddressDeny=any stays.
fleet=/usr/share/doc/soffid-otp/examples/guardd-fleet.conf
[ -e "$fleet" ] || fail "$fleet not installed"
mkdir -p "$scratch/units/guardd.service.d"
cp /lib/systemd/system/guardd.service "$scratch/units/"
cp "$fleet" "$scratch/units/guardd.service.d/fleet.conf"
systemd-analyze verify "$scratch/units/guardd.service" >"$scratch/verify" 2>&1 \
  || fail "unit + fleet drop-in do not verify: $(cat "$scratch/verify")"
grep -q fleet.conf "$scratch/verify" && fail "systemd-analyze: $(cat "$scratch/verify")"
systemd-analyze security --offline=true "$scratch/units/guardd.service" >"$scratch/security" 2>&1 || true
grep -q 'may allocate Internet sockets' "$scratch/security" || fail "the fleet drop-in does not allow AF_INET"
grep -q 'defines IP address allow list' "$scratch/security" || fail "the fleet drop-in lost IPAddressDeny=any"

echo "== run guardd as the unit does, log in through the installed module"
install -d -m 0755 /run/soffid-otp
/usr/sbin/guardd 2>"$scratch/guardd.log" &
pid=$!
for _ in $(seq 100); do [ -S /run/soffid-otp/guardd.sock ] && break; sleep 0.1; done
[ -S /run/soffid-otp/guardd.sock ] || fail "guardd did not start: $(cat "$scratch/guardd.log")"
useradd -m "$user"
secret=$(guardctl enroll "$user" | sed -nE 's/^otpauth:.*[?&]secret=([A-Z2-7]+).*/\1/p')
oathtool --totp -b --now "$(date -u -d '-30 seconds' '+%Y-%m-%d %H:%M:%S UTC')" "$secret" \
  | guardctl confirm "$user" >/dev/null
# A sudo-named stack under pam_wrapper: the shipped rules ask enrolled users on sudo.
mkdir "$scratch/pam"
echo "auth required pam_soffid_otp.so" > "$scratch/pam/sudo"
echo "auth required pam_deny.so" > "$scratch/pam/other"
login() {
  printf '%s\n' "$1" | LD_PRELOAD=libpam_wrapper.so PAM_WRAPPER=1 \
    PAM_WRAPPER_SERVICE_DIR="$scratch/pam" pamtester sudo "$user" authenticate >/dev/null 2>&1
}
login "$(oathtool --totp -b "$secret")" || fail "login with the right code failed"
login 000000 && fail "a wrong code was accepted"

echo "== pam-auth-update"
pam-auth-update --enable soffid-otp
grep -q pam_soffid_otp.so /etc/pam.d/common-auth || fail "--enable did not add the module"
grep -q pam_soffid_otp.so /etc/pam.d/common-account || fail "--enable did not add the account line"
grep -q pam_soffid_otp.so /etc/pam.d/common-session || fail "--enable did not add the session line"
grep -q pam_soffid_otp.so /etc/pam.d/common-session-noninteractive \
  && fail "the session line reached non-interactive sessions (cron)"
pam-auth-update --disable soffid-otp
grep -q pam_soffid_otp.so /etc/pam.d/common-auth && fail "--disable left the module"
grep -q pam_soffid_otp.so /etc/pam.d/common-session && fail "--disable left the session line"

echo "== upgrade keeps tokens and the key"
key_before=$(sha256sum /etc/soffid-otp/guardd.key)
kill "$pid"; wait "$pid" || true; pid=""
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$deb2" >/dev/null
[ "$(sha256sum /etc/soffid-otp/guardd.key)" = "$key_before" ] || fail "upgrade replaced the key"
[ "$(dpkg-query -W -f '${Version}' soffid-otp)" = 0.1.1-1 ] || fail "not upgraded"
/usr/sbin/guardd 2>>"$scratch/guardd.log" &
pid=$!
for _ in $(seq 100); do [ -S /run/soffid-otp/guardd.sock ] && break; sleep 0.1; done
login "$(oathtool --totp -b --now "$(date -u -d '+30 seconds' '+%Y-%m-%d %H:%M:%S UTC')" "$secret")" \
  || fail "the token did not survive the upgrade: $(cat "$scratch/guardd.log")"

echo "== purge leaves nothing"
pam-auth-update --enable soffid-otp
kill "$pid"; wait "$pid" || true; pid=""
dpkg --purge soffid-otp >/dev/null
for f in /usr/sbin/guardd /usr/bin/guardctl /usr/lib/x86_64-linux-gnu/security/pam_soffid_otp.so \
         /etc/soffid-otp /var/lib/soffid-otp /usr/share/pam-configs/soffid-otp /etc/pam.d/soffid-otp; do
  [ -e "$f" ] && fail "$f left after purge"
done
grep -q pam_soffid_otp.so /etc/pam.d/common-auth && fail "purge left the module in common-auth"
[ "$(sha256sum /etc/pam.d/common-auth)" = "$common_auth_before" ] || fail "common-auth not restored"
echo "deb.sh: OK"
