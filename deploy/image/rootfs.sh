#!/bin/sh
# rootfs.sh BINARY DIR - lay out the root filesystem of the lazyblob image in DIR: the
# daemon, the shared libraries it links (found with ldd), busybox for the DaemonSet's shell
# steps (sh, nsenter, cmp...), the node installer and the system CA bundle. The Dockerfile
# and build-image.sh both call it, so both build the same image.
set -eu

bin=$1
root=$2
here=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$root/usr/local/bin" "$root/bin" "$root/etc/ssl/certs" "$root/etc/lazyblob" \
	"$root/tmp" "$root/run/lazyblob" "$root/var/lib/lazyblob" "$root/var/cache/lazyblob"
chmod 1777 "$root/tmp"
cp "$bin" "$root/usr/local/bin/lazyblob"
chmod 0755 "$root/usr/local/bin/lazyblob"
cp "$here/../kubernetes/install-host-service.sh" "$root/usr/local/bin/install-host-service.sh"
chmod 0755 "$root/usr/local/bin/install-host-service.sh"

# the libraries and the dynamic loader, at the paths the binary looks for them
ldd "$bin" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
	mkdir -p "$root$(dirname "$lib")"
	cp -L "$lib" "$root$lib"
done

busybox=$(command -v busybox)
cp "$busybox" "$root/bin/busybox"
# one link per applet the scripts use (a static busybox needs no libraries)
for applet in sh ash cat chmod cmp cp dirname echo env grep ls mkdir mktemp mv nsenter rm sleep test \[; do
	ln -sf busybox "$root/bin/$applet"
done

if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
	cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
