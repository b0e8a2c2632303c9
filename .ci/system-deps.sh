#!/usr/bin/env bash
# System packages the embedded default and the tests need: OpenSSH's server (the stand-in instance), git, and
# Prometheus with its Pushgateway (the embedded default's monitoring; only ever started on loopback by the project).
# cloud-init and shellcheck validate the user-data in tests, chromium runs the browser test (those tests skip, saying
# why, when they are missing, and fail under CI=true).
set -euo pipefail

missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
[ -x /usr/bin/prometheus ] || missing+=(prometheus)
[ -x /usr/bin/prometheus-pushgateway ] || missing+=(prometheus-pushgateway)
if [ "${WITH_TEST_TOOLS:-0}" = 1 ]; then
  command -v cloud-init >/dev/null 2>&1 || missing+=(cloud-init)
  command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
  # The browser test (tests/ui) drives Debian's Chromium through Playwright: no browser download. Where
  # EC2_TRAINER_CHROMIUM names another Chromium (the GitHub workflow's), that one must be there.
  if [ -n "${EC2_TRAINER_CHROMIUM:-}" ]; then
    [ -x "$EC2_TRAINER_CHROMIUM" ] || { echo "EC2_TRAINER_CHROMIUM=$EC2_TRAINER_CHROMIUM is not an executable: install that browser or unset it" >&2; exit 1; }
  else
    [ -x /usr/bin/chromium ] || missing+=(chromium)
  fi
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing ${missing[*]} with apt-get (the embedded default runs sshd and Prometheus on loopback itself, never as services)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts nothing here (no systemd in containers); the embedded default runs its own sshd processes.
else
  echo "Missing system packages: ${missing[*]}." >&2
  echo "Install them with your package manager, e.g.: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
