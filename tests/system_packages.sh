#!/bin/sh
# The Debian packages some tests use, installed by `make test` where it can:
#   golang-go, golang-golang-x-mod-dev  tests/test_go_interop.py: Go's golang.org/x/mod (an independent RFC 6962 /
#                                       signed-note / tlog implementation) checks our receipts, proofs and tiles
#   chromium                            tests/ui: drives the Dagster UI in a headless browser
# Quiet and quick when they are there (no apt-get call at all). When one is missing: as root with apt-get, install
# it (apt-get update first); otherwise say which tests will be skipped and why, and go on (pytest -ra lists the skips).
set -eu

xmod_present() {
  # as tests/interop/build.py looks for it: golang.org/x/mod's sumdb source under $GOPATH or Debian's /usr/share/gocode
  old_ifs=$IFS
  IFS=:
  for dir in ${GOPATH:-} /usr/share/gocode; do
    if [ -n "$dir" ] && [ -f "$dir/src/golang.org/x/mod/sumdb/note/note.go" ] \
        && [ -f "$dir/src/golang.org/x/mod/sumdb/tlog/tlog.go" ]; then
      IFS=$old_ifs
      return 0
    fi
  done
  IFS=$old_ifs
  return 1
}

missing=""
command -v go >/dev/null 2>&1 || missing="$missing golang-go"
xmod_present || missing="$missing golang-golang-x-mod-dev"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -z "$missing" ] && exit 0
missing=${missing# }

if [ "$(id -u)" != 0 ]; then
  why="not root"
elif ! command -v apt-get >/dev/null 2>&1; then
  why="no apt-get: not a Debian system"
else
  echo "make test: installing the Debian packages the tests use: $missing"
  if apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; then
    exit 0
  fi
  why="apt-get install failed"
fi

go_missing=""
for pkg in $missing; do
  case $pkg in golang-*) go_missing="$go_missing $pkg" ;; esac
done
[ -n "$go_missing" ] && echo "make test: the Go checks (tests/test_go_interop.py, test_log_export.py, test_witnessed_log.py) will be skipped:" \
  "$why, so${go_missing} not installed"
case " $missing " in *" chromium "*)
  echo "make test: the browser tests (tests/ui) will be skipped: $why, so chromium not installed" ;;
esac
exit 0
