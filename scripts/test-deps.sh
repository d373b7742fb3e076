#!/usr/bin/env bash
# The first half of the README's test command: on a fresh Debian machine it installs what the
# tests use besides Rust and PostgreSQL (each is skipped when already there), and stops with a
# clear message when PostgreSQL does not answer: the suite runs its backend tests on PostgreSQL
# and on SQLite, and the PostgreSQL half is required. The second half runs every test of the
# workspace: `cargo nextest run --workspace`.
#
#   promtool   Debian's prometheus package: tests/dashboards.rs checks the alert rules with it
#   chromium   Debian's chromium: tests/console_browser.rs drives the console in it
#   e2e/node_modules   playwright-core from npm (e2e/package-lock.json), which drives chromium
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

# The server the README's command points the tests at (or DATABASE_URL, when set).
postgres_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
if ! command -v pg_isready >/dev/null; then
    echo "test-deps: pg_isready is not installed; tests/postgres_required.rs checks PostgreSQL instead" >&2
elif ! pg_isready -q -d "$postgres_url"; then
    echo "test-deps: PostgreSQL at ${postgres_url#*@} does not answer; the tests need it." >&2
    echo "test-deps: start it, for example: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
    exit 1
fi
