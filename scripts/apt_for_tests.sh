# Sourced by the *_for_tests.sh scripts: install Debian packages that tests need, as root or
# through password-less sudo. Callers keep stdout for their own answer, so apt writes to stderr.

# need_root WHAT: set `as_root` (empty as root, else `sudo -n`) or say why WHAT cannot be installed.
need_root() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "$1 is not installed, and there is no apt-get to install it"
    return 1
  fi
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    log "$1 is not installed and installing it needs root (or password-less sudo)"
    return 1
  fi
}

# apt_install PACKAGE...: after need_root. DEBIAN_FRONTEND goes through `env`, since sudo drops the
# caller's environment. Bounded: a hung mirror must not hang CI.
apt_install() {
  timeout 900 "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  timeout 900 "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "$@" >&2
}
