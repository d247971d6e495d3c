#!/usr/bin/env bash
# Make sure the system packages the project needs are present.
#   system-deps.sh python     Python >= 3.11 with venv support
#   system-deps.sh rabbitmq   the rabbitmq-server package (a private node is started from it)
#   system-deps.sh rclone     rclone, the baseline of the shipper benchmark
#   system-deps.sh chromium   Chromium, for the operator page's browser test
#   system-deps.sh promtool   Prometheus's promtool, to check and unit-test the alert rules
#   system-deps.sh iproute2   ip and tc (network namespaces, queues), for the rehearsal of the k3s manifests
#                             and the uplink bed
# Missing packages are installed with apt-get when running as root; otherwise the
# script says what to install and fails.
set -euo pipefail

PYTHON=${PYTHON:-python3}

need_root_or_explain() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "photoferry needs: $*" >&2
    echo "install it as root:  sudo apt-get install -y $*" >&2
    exit 1
  fi
}

apt_install() {
  need_root_or_explain "$@"
  echo "installing $* with apt-get" >&2
  # Package scripts must not start system services here (containers, CI): a
  # policy-rc.d answering 101 denies it, and is removed again if we created it.
  POLICY_CREATED=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && POLICY_CREATED=1
  fi
  trap remove_policy EXIT
  if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
  remove_policy
}

remove_policy() {
  if [ -n "${POLICY_CREATED:-}" ]; then
    rm -f /usr/sbin/policy-rc.d
    POLICY_CREATED=""
  fi
}

case "${1:-}" in
  python)
    if ! command -v "$PYTHON" >/dev/null; then
      apt_install python3 python3-venv
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "photoferry needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
      exit 1
    fi
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
      apt_install "python3-venv"
    fi
    ;;
  rabbitmq)
    if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
      apt_install rabbitmq-server
    fi
    ;;
  rclone)
    command -v rclone >/dev/null || apt_install rclone
    ;;
  chromium)
    [ -x /usr/bin/chromium ] || apt_install chromium
    ;;
  promtool)
    command -v promtool >/dev/null || apt_install prometheus
    ;;
  iproute2)
    { command -v ip >/dev/null && command -v tc >/dev/null; } || apt_install iproute2
    ;;
  *)
    echo "usage: $0 python|rabbitmq|rclone|chromium|promtool|iproute2" >&2
    exit 2
    ;;
esac
