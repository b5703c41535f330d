#!/bin/sh
# build-image.sh [--binary PATH] [--plain-http] REFERENCE - build the lazyblob image without
# Docker (the same layout as the Dockerfile: deploy/image/rootfs.sh) with umoci, push it
# with skopeo to REFERENCE (registry/repository:tag) and print its manifest digest.
#   deploy/image/build-image.sh registry.example.com/lazyblob:0.1.0
# --binary: the lazyblob to put in (default target/release/lazyblob, built if missing);
# --plain-http: the registry speaks HTTP (a test registry on loopback).
# Needs umoci, skopeo, busybox-static (Debian packages) and binutils' strip.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
bin=
tls=true
while [ $# -gt 1 ]; do
	case $1 in
	--binary) bin=$2; shift 2 ;;
	--plain-http) tls=false; shift ;;
	*) echo "build-image.sh: unknown option $1" >&2; exit 2 ;;
	esac
done
[ $# -eq 1 ] || { echo "usage: build-image.sh [--binary PATH] [--plain-http] REFERENCE" >&2; exit 2; }
ref=$1
if [ -z "$bin" ]; then
	bin=$top/target/release/lazyblob
	[ -x "$bin" ] || (cd "$top" && cargo build --release --locked --bin lazyblob)
fi
for tool in umoci skopeo busybox strip; do
	command -v "$tool" >/dev/null || { echo "build-image.sh: $tool is missing" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
strip --strip-debug -o "$work/lazyblob" "$bin"
sh "$here/rootfs.sh" "$work/lazyblob" "$work/rootfs"

case $(uname -m) in
x86_64) arch=amd64 ;;
aarch64) arch=arm64 ;;
*) arch=$(uname -m) ;;
esac
layout=$work/oci
umoci init --layout "$layout"
umoci new --image "$layout:lazyblob"
# one layer holding the whole root filesystem, owned by root
umoci insert --image "$layout:lazyblob" "$work/rootfs" / >/dev/null
umoci config --image "$layout:lazyblob" --os linux --architecture "$arch" \
	--config.env PATH=/usr/local/bin:/bin \
	--config.entrypoint /usr/local/bin/lazyblob \
	--config.cmd daemon --config.cmd --config --config.cmd /etc/lazyblob/lazyblob.toml \
	--config.label org.opencontainers.image.title=lazyblob \
	--config.label "org.opencontainers.image.version=$("$bin" --version | awk '{ print $2 }')"
umoci gc --layout "$layout"

skopeo copy --quiet --dest-tls-verify="$tls" --digestfile "$work/digest" \
	"oci:$layout:lazyblob" "docker://$ref"
cat "$work/digest"
echo
