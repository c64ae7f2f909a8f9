#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are on this machine and print
# the directory that holds them as the last line of stdout.
#
# The Postgres instance-storage test (model_eval_tests/test_postgres_instance.py) starts its own
# throwaway cluster from these binaries; it never uses a system-wide server. Safe to run again:
# when the binaries are already there it only looks for them (no apt, well under a second).
#
# Install path (Debian/Ubuntu only): apt-get install postgresql, as root or through sudo. The
# package would normally create and start a "main" cluster on port 5432; a createcluster.d drop-in
# turns that off for the install, since the tests need the binaries, not a running system server.
set -euo pipefail

# Where Debian puts server binaries; overridable only so the install branch can be exercised.
PG_LIB_ROOT=${PG_LIB_ROOT:-/usr/lib/postgresql}

log() { echo "postgres_for_tests: $*" >&2; }

# A directory counts only if it holds all three programs: pg_ctl starts the `postgres` it finds
# next to itself, so a PATH with initdb but without the server is not enough.
usable_dir() {
  [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]
}

find_bin_dir() {
  local found dir
  # 1. PATH (e.g. /usr/local/bin symlinks, or a source build). Resolve symlinks to the real dir.
  if found=$(command -v pg_ctl 2>/dev/null); then
    dir=$(dirname "$(readlink -f "$found")")
    if usable_dir "$dir"; then echo "$dir"; return 0; fi
  fi
  # 2. Debian's versioned dirs, newest major version first (sort -V: 9 < 15 < 16).
  for dir in $(ls -d "$PG_LIB_ROOT"/*/bin 2>/dev/null | sort -V -r); do
    if usable_dir "$dir"; then echo "$dir"; return 0; fi
  done
  return 1
}

if bin_dir=$(find_bin_dir); then
  echo "$bin_dir"
  exit 0
fi

# shellcheck source=scripts/apt_for_tests.sh
source "$(dirname "$0")/apt_for_tests.sh"
need_root "PostgreSQL (initdb/pg_ctl/postgres, looked for on PATH and in $PG_LIB_ROOT/*/bin)" || exit 1

log "installing PostgreSQL with apt-get (takes a minute) ..."
# No main cluster: the package's postinst reads create_main_cluster from createcluster.conf, which
# includes this directory. Only our own drop-in is added, and it is removed again afterwards so the
# machine's later PostgreSQL installs behave as usual.
dropin_dir=/etc/postgresql-common/createcluster.d
dropin="$dropin_dir/zz-model-eval-tests-no-main-cluster.conf"
created_dir=false
if [ ! -d "$dropin_dir" ]; then created_dir=true; fi
"${as_root[@]}" mkdir -p "$dropin_dir"
echo "create_main_cluster = false" | "${as_root[@]}" tee "$dropin" >/dev/null
cleanup() {
  "${as_root[@]}" rm -f "$dropin"
  if $created_dir; then "${as_root[@]}" rmdir "$dropin_dir" 2>/dev/null || true; fi
}
trap cleanup EXIT

apt_install postgresql

if bin_dir=$(find_bin_dir); then
  log "installed: $bin_dir"
  echo "$bin_dir"
  exit 0
fi
log "apt-get install postgresql finished but no initdb/pg_ctl/postgres was found"
exit 1
