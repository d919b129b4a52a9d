#!/bin/sh
# Installs the system programs some tests drive, when missing, from Debian's packages, if
# this is root with apt-get (CI's fresh machine); otherwise names each one missing, and
# the tests that need it skip. Each group installs on its own, so one the distribution
# lacks blocks no other. (`make test` runs this.)
set -u
can_install=false
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then can_install=true; fi
updated=false

# need WHAT CHECK PACKAGE...: install the packages unless the shell command CHECK passes.
need() {
    what=$1 check=$2
    shift 2
    sh -c "$check" >/dev/null 2>&1 && return 0
    if $can_install; then
        $updated || apt-get update -qq >/dev/null 2>&1
        updated=true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
        sh -c "$check" >/dev/null 2>&1 && return 0
    fi
    echo "$what is not installed; the tests that need it will skip"
}

# The HTML report renders in headless Chromium.
need chromium "test -x /usr/bin/chromium" chromium
# deploy/'s alert rules and dashboard run in a real Prometheus (no exporters or daemons).
need prometheus "command -v prometheus && command -v promtool" --no-install-recommends prometheus
# deploy/docker-compose.yml is checked against the Compose schema (`docker-compose config`).
need docker-compose "command -v docker-compose" --no-install-recommends docker-compose
# The Helm chart renders with Go's text/template and Sprig (tests/helmtemplate).
gocode=/usr/share/gocode/src
need "Go with Sprig" "command -v go && test -d $gocode/github.com/Masterminds/sprig && test -d $gocode/gopkg.in/yaml.v2" \
    --no-install-recommends golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev
exit 0
