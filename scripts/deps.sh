#!/usr/bin/env bash
# Installs the Debian packages soffid-otp needs to build and to test. Idempotent; needs root
# (or sudo) only when something is missing. Usage: scripts/deps.sh build|deb|test
set -euo pipefail

build_pkgs=(libpam0g-dev libclang-dev libssl-dev pkg-config oathtool pamtester libpam-wrapper)
test_pkgs=(libpam-wrapper pamtester oathtool libpam-oath libpam-google-authenticator util-linux binutils openssh-server openssh-client sudo python3-paramiko iproute2 procps passwd postgresql openssl)

deb_pkgs=(help2man lintian dpkg-dev)

case "${1:-build}" in
  build) pkgs=("${build_pkgs[@]}") ;;
  deb) pkgs=("${build_pkgs[@]}" "${deb_pkgs[@]}") ;;
  test) pkgs=("${build_pkgs[@]}" "${test_pkgs[@]}" "${deb_pkgs[@]}") ;;
  *) echo "usage: $0 build|deb|test" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "Installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq -o DPkg::Lock::Timeout=300
$sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
