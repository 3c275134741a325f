#!/usr/bin/env bash
# The headless browser of tests/test_report_html.py: Debian's chromium from the system packages.
# Prints the browser's path on its last line. Installs it (apt-get, as root, as CI runs) when missing;
# without root or apt it says what to run and exits 1.
set -euo pipefail
find_browser() {
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}
if path=$(find_browser); then echo "$path"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no chromium found; install it with: sudo apt-get install -y chromium" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
find_browser
