#!/usr/bin/env bash
# Installs nydusd and nydus-image (Nydus 2.2.0, from crates.io) into /opt/nydus/bin for the
# side-by-side rows of `cargo bench --bench lazyblob -- --only start`. Not needed by the
# tests. Builds from source: about 10 minutes on 2 cores.
set -euo pipefail
if [ -x /opt/nydus/bin/nydusd ] && [ -x /opt/nydus/bin/nydus-image ]; then
    echo "nydus already installed in /opt/nydus/bin"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# libz-sys builds zlib-ng with cmake; openssl-sys wants its headers
apt-get install -y -qq cmake libssl-dev pkg-config fuse3 >/dev/null
# --locked: its own Cargo.lock (newer versions of its nydus-* crates do not build together)
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/nydus-build}" \
    cargo install --locked nydus-rs --version 2.2.0 --root /opt/nydus
