#!/usr/bin/env bash
# Builds target/debian/soffid-otp_<version>_amd64.deb from a clean checkout: release binaries,
# man pages (from the programs' own --help where they have one), shell completions, cargo-deb.
# DEB_VERSION=0.1.1-1 overrides the package version (upgrade tests).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh deb
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked --version 3.8.0

cargo build --release --workspace
# The module on its own: built with the rest, cargo would give it the daemon's features of the
# crates they share (tonic's client and server in proto), which it does not use.
cargo build --release -p pam_soffid_otp
# Where cargo put the binaries: target/ unless CARGO_TARGET_DIR (or a config) says otherwise.
# cargo-deb maps the `target/release/` asset paths in guardd/Cargo.toml to the same place.
release="$(cargo metadata --format-version 1 --no-deps \
  | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)/release"
out="$release/deb-assets"
mkdir -p "$out"
help2man -N -s 8 -n "soffid-otp second-factor daemon" "$release/guardd" \
  | gzip -9n > "$out/guardd.8.gz"
help2man -N -s 1 -n "manage soffid-otp tokens, rules and password recovery" "$release/guardctl" \
  | gzip -9n > "$out/guardctl.1.gz"
gzip -9n < packaging/man/pam_soffid_otp.8 > "$out/pam_soffid_otp.8.gz"
gzip -9n < packaging/man/rules.toml.5 > "$out/rules.toml.5.gz"
"$release/guardctl" completions bash > "$out/guardctl"
"$release/guardctl" completions zsh > "$out/_guardctl"

args=(-p guardd --no-build --no-strip -o target/debian/)
[ -n "${DEB_VERSION:-}" ] && args+=(--deb-version "$DEB_VERSION")
mkdir -p target/debian
cargo deb "${args[@]}"
