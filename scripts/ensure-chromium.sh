#!/usr/bin/env bash
# The gallery's browser tests drive Debian's Chromium (Playwright's own browser download does not
# work on a closed network). Install the package when it is missing; fail clearly otherwise.
set -euo pipefail
BIN="${CHROMIUM:-/usr/bin/chromium}"
if [ -x "$BIN" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  fi
  echo "installing Debian's chromium for the gallery's browser tests"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null || true
fi
if [ ! -x "$BIN" ]; then
  echo "error: $BIN is missing; install Debian's 'chromium' package (or set CHROMIUM to a Chromium binary)" >&2
  exit 1
fi
