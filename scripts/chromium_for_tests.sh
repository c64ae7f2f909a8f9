#!/usr/bin/env bash
# Make sure Debian's Chromium and ChromeDriver are on this machine and print the two paths
# (browser, then driver) as the last line of stdout, separated by a space.
#
# The browser tests (model_eval_tests/test_browser.py) open the HTML report and the Dagster UI in
# headless Chromium driven through ChromeDriver by Selenium. Selenium's own driver download and
# Playwright's browser download cannot work on a machine without general internet access, so the
# browser comes from the distribution's packages. Safe to run again: when both programs are there
# it only looks for them (no apt, well under a second).
set -euo pipefail

log() { echo "chromium_for_tests: $*" >&2; }

find_programs() {
  local browser driver
  browser=$(command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null) || return 1
  driver=$(command -v chromedriver 2>/dev/null) || return 1
  echo "$browser $driver"
}

if found=$(find_programs); then
  echo "$found"
  exit 0
fi

# shellcheck source=scripts/apt_for_tests.sh
source "$(dirname "$0")/apt_for_tests.sh"
need_root "Chromium (chromium and chromedriver, looked for on PATH)" || exit 1
log "installing chromium and chromium-driver with apt-get (takes a minute or two) ..."
apt_install chromium chromium-driver

if found=$(find_programs); then
  log "installed: $found"
  echo "$found"
  exit 0
fi
log "apt-get install chromium chromium-driver finished but chromium/chromedriver was not found"
exit 1
