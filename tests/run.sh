#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit tests, a real guardd on a real socket, the
# built module in the system's libpam through pam_wrapper + pamtester, a real sshd and sudo, and
# the Debian package installed, upgraded and purged.
# Run from anywhere; installs missing Debian packages first. Some checks need root (CI is root).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh test

cargo fmt --all -- --check
cargo build --workspace --all-targets
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The Debian package: build, install, log in, upgrade, purge (root only; skipped otherwise).
bash tests/deb.sh
