#!/usr/bin/env bash
# System packages the test suite needs, installed from Debian when absent (README test command, .ci/run).
# Never fails the test command: without root or apt-get it warns, and the tests that need a package skip.
# One block per package; append new ones below rather than rewriting this file.
set -u

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"; else return 1; fi
}

apt_updated=""
apt_install() {  # apt_install PACKAGE...: one `apt-get update` per run, then a quiet non-interactive install
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ -z "$apt_updated" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || return 1
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# chromium: the browser tests of the preview page (tests/test_preview_browser.py).
if ! [ -x /usr/bin/chromium ]; then
    echo "install-test-deps: installing chromium for the browser tests..." >&2
    apt_install chromium \
        || echo "install-test-deps: WARNING: could not install chromium (no root or no apt-get): the browser tests will skip" >&2
fi

# postgresql: every store test also runs on a throwaway PostgreSQL server (tests/postgres.py), which
# needs the server binaries of Debian's package (/usr/lib/postgresql/<version>/bin).
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    echo "install-test-deps: installing postgresql for the store tests..." >&2
    apt_install postgresql \
        || echo "install-test-deps: WARNING: could not install postgresql (no root or no apt-get): the PostgreSQL store tests will skip" >&2
fi

exit 0
