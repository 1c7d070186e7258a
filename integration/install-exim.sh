#!/usr/bin/env bash
# Puts Debian's Exim (exim4-daemon-heavy) where integration/exim_test.go
# looks for it, without installing the package: every Debian Exim package
# provides and conflicts with mail-transport-agent, so `apt-get install`
# would remove Postfix, which other tests need. The package is fetched with
# apt-get download and unpacked with dpkg-deb -x; the test runs its
# /usr/sbin/exim4 with a configuration of its own (-C).
#
# exim4-daemon-heavy, not -light: Debian 12 builds only the heavy daemon
# with PROXY protocol support (`exim4 -bV` lists PROXY).
#
# The shared libraries it links are in integration/packages-exim.txt (apt
# installs those like any other package; they conflict with nothing). Exim
# refuses to start unless its compiled-in user Debian-exim exists, so this
# creates that system user (as exim4-base's postinst would).
#
# Usage (as root): integration/install-exim.sh [DIR]   (default
# /opt/exim4-daemon-heavy; the test reads SMTP_EDGE_EXIM for another place)
set -euo pipefail

dest=${1:-/opt/exim4-daemon-heavy}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download fetches as the _apt user when it can write there
if getent passwd _apt >/dev/null; then chown _apt "$work"; fi

(cd "$work" && apt-get download -q exim4-daemon-heavy)
rm -rf "$dest.new"
dpkg-deb -x "$work"/exim4-daemon-heavy_*.deb "$dest.new"
rm -rf "$dest"
mv "$dest.new" "$dest"
exim="$dest/usr/sbin/exim4"
# the package's binary is setuid root; the test runs it as root, and a
# setuid copy outside the package manager's care is not wanted
chmod u-s "$exim"

if ldd "$exim" | grep 'not found'; then
	echo "install-exim.sh: $exim lacks the libraries above; add their packages to integration/packages-exim.txt" >&2
	exit 1
fi

if ! getent passwd Debian-exim >/dev/null; then
	group=(--user-group)
	if getent group Debian-exim >/dev/null; then group=(--gid Debian-exim); fi
	useradd --system "${group[@]}" --home-dir /var/spool/exim4 --no-create-home \
		--shell /usr/sbin/nologin Debian-exim
fi

version=$(env -i "$exim" -C /dev/null -bV)
if ! grep -q '^Support for:.* PROXY' <<<"$version"; then
	echo "install-exim.sh: $exim has no PROXY support:" >&2
	echo "$version" >&2
	exit 1
fi
echo "install-exim.sh: $(head -n1 <<<"$version") in $dest"
