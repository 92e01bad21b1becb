#!/usr/bin/env bash
# Makes a self-signed certificate for localhost: config/cert.pem and config/key.pem (or DIR/...).
# Usage: scripts/gen-certs.sh [DIR] [--force]
set -euo pipefail
dir="config"
force=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    *) dir="$a" ;;
  esac
done
mkdir -p "$dir"
if [ -e "$dir/cert.pem" ] && [ -e "$dir/key.pem" ] && [ "$force" = 0 ]; then
  echo "gen-certs: $dir/cert.pem and $dir/key.pem exist (use --force to replace)"
  exit 0
fi
command -v openssl >/dev/null || { echo "gen-certs: openssl not installed: run make setup" >&2; exit 1; }
openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
chmod 600 "$dir/key.pem"
echo "gen-certs: wrote $dir/cert.pem and $dir/key.pem (self-signed, CN=localhost, 365 days)"
