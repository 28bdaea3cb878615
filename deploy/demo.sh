#!/usr/bin/env bash
# The main job on a fresh machine: install, start the lab, and walk through crashcart against it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export PATH="$PWD/.venv/bin:/usr/sbin:/sbin:$PATH"
crashcart lab up
export CRASHCART_CONFIG=/var/lib/crashcart-lab/crashcart.toml
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }
step "The inventory" crashcart hosts
step "Can crashcart act on every host?" crashcart check
step "What isolating web-1 would do (nothing changes)" crashcart isolate-host web-1 --dry-run --reason "demo: EDR alert"
step "Contain web-1" crashcart isolate-host web-1 --reason "demo: EDR alert" --incident INC-DEMO-1
step "Running it again changes nothing" crashcart isolate-host web-1 --reason "demo: second responder" --incident INC-DEMO-1
step "Release web-1" crashcart release-host web-1 --reason "demo: host rebuilt" --incident INC-DEMO-1
step "Quarterly restore test: real restores, content proof, RPO/RTO" crashcart restore-test
step "Rotate web-1's TLS certificate (proved by a handshake, old serial revoked)" crashcart rotate-tls web-1
step "Served certificates" crashcart certs
step "Rotate db-1's LUKS passphrase (new keyslot proved and escrowed, old refused)" crashcart rotate-luks db-1
step "A tabletop exercise against staging, 600x faster than real time" \
    crashcart tabletop run ransomware-ephi-host --speed 600
step "Is the evidence intact?" crashcart evidence verify
step "Runs recorded" crashcart evidence list
step "The auditor's report" crashcart evidence report --format html --output /var/lib/crashcart-lab/report.html
printf '\nDemo done: the report is /var/lib/crashcart-lab/report.html. The lab is still running: `crashcart lab down` removes it.\n'
