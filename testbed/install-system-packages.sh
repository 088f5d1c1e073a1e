#!/bin/sh
# Installs the Debian 12 packages the testbed, the tests, the demo and the benchmarks need:
# Dovecot (IMAP, POP3), Postfix, swaks, curl, nginx with its mail module (the reference proxy),
# openssl and CA certificates; procps for pgrep and libnet-ssleay-perl for swaks' TLS; python3-venv,
# which the Makefile's next step needs and a minimal Debian 12 lacks.
# Called by `make system-packages` (so by `make demo`, `make test` and .ci/run), as root.
# No system service is started: a policy-rc.d that exits 101 is in place during the install and
# whatever was there before is put back afterwards; the tests start their own instances.
# Idempotent: when every package is installed already it only checks and exits.
set -eu

PACKAGES="dovecot-imapd dovecot-pop3d postfix swaks curl nginx libnginx-mod-mail openssl
ca-certificates procps libnet-ssleay-perl python3-venv"
# invoke-rc.d asks this file; the override exists for tests/testbed/test_install_system_packages.py.
POLICY=${POLICY_RC_D:-/usr/sbin/policy-rc.d}

missing=""
for package in $PACKAGES; do
    status=$(dpkg-query --show --showformat='${Status}' "$package" 2>/dev/null || true)
    if [ "$status" != "install ok installed" ]; then
        missing="$missing $package"
    fi
done
if [ -z "$missing" ]; then
    echo "install-system-packages: all packages are installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-packages: missing:$missing; run this script as root" >&2
    exit 1
fi

# Block service starts; keep the machine's own policy-rc.d, if any, and restore it on any exit.
backup=""
if [ -e "$POLICY" ]; then
    backup=$(mktemp)
    cp -p "$POLICY" "$backup"
fi
restore() {
    if [ -n "$backup" ]; then
        cp -p "$backup" "$POLICY"
        rm -f "$backup"
    else
        rm -f "$POLICY"
    fi
}
trap restore EXIT
trap 'exit 130' INT TERM
printf '#!/bin/sh\n# install-system-packages.sh: no service starts during the install\nexit 101\n' >"$POLICY"
chmod 0755 "$POLICY"

# Postfix asks what kind of mail system this is; the testbed writes its own configuration.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

export DEBIAN_FRONTEND=noninteractive
echo "install-system-packages: installing$missing"
apt-get update -qq
# shellcheck disable=SC2086 # the package list is meant to be split into words
apt-get install -y -qq --no-install-recommends $missing
echo "install-system-packages: done"
