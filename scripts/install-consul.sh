#!/usr/bin/env bash
# Installs the `consul` binary the tests need. Debian's current suite has no consul package; the
# previous suite (bullseye) carries consul 1.8.7, whose HTTP API (agent, health, catalog, KV with
# blocking queries) is what HexGate uses. The bullseye suite is added for this one download, using
# the mirror this machine's own apt sources already name, and removed again afterwards.
# A `consul` already on PATH is used as is.
set -euo pipefail

if command -v consul >/dev/null 2>&1; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^(http|https|file):/) {print $i; exit}}' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
  echo "install-consul: no Debian mirror found in /etc/apt/sources.list(.d)" >&2
  exit 1
fi

list=/etc/apt/sources.list.d/hexgate-bullseye-consul.list
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  $SUDO rm -f "$list"
  rm -rf "$work"
}
trap cleanup EXIT

echo "install-consul: fetching consul from the bullseye suite of $mirror"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" | $SUDO tee "$list" >/dev/null
$SUDO apt-get update -qq -o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts="-" -o APT::Get::List-Cleanup="0"
(cd "$work" && apt-get download -qq -o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts="-" consul)
dpkg-deb -x "$work"/consul_*.deb "$work/root"
$SUDO install -m 0755 "$work/root/usr/bin/consul" /usr/local/bin/consul
consul version | head -1
