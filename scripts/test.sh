#!/usr/bin/env bash
# The README's test command. On a fresh Debian machine it first installs what the tests use
# besides Rust and PostgreSQL, then runs every test of the workspace, each on a fresh
# database of the PostgreSQL server that DATABASE_URL names (default: 127.0.0.1:5432).
#
#   promtool   Debian's prometheus package: tests/dashboards.rs checks the alert rules with it
#   chromium   Debian's chromium: tests/console_browser.rs drives the console in it
#   e2e/node_modules   playwright-core from npm (e2e/package-lock.json), which drives chromium
#
# Arguments are passed to `cargo nextest run` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

packages=()
command -v promtool >/dev/null || packages+=(prometheus)
[ -x /usr/bin/chromium ] || packages+=(chromium)
if [ "${#packages[@]}" -gt 0 ]; then
    as_root apt-get update
    # prometheus's postinst asks invoke-rc.d to start the server, which a container's
    # policy-rc.d refuses; the install succeeds either way and only promtool is used.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"
fi
[ -d e2e/node_modules/playwright-core ] || npm ci --prefix e2e --no-audit --no-fund
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
exec cargo nextest run --workspace "$@"
