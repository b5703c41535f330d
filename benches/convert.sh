#!/usr/bin/env bash
# Conversion throughput: `lazyblob convert` (OCI layout -> OCI layout, one uncompressed tar
# layer) against `mkfs.erofs` building an image from the same unpacked tree, both on this
# machine in one run. Prints MB/s of uncompressed file data and the ratio.
# usage: benches/convert.sh [LAZYBLOB_BINARY] [SIZE_MIB]
# TREE=DIR converts a copy of an existing tree (say /usr/lib/x86_64-linux-gnu: real, compressible
# files) in place of the generated one; LAYER_GZIP=1 compresses the layer with `gzip -6`, as most images'
# layers are (mkfs.erofs still reads the unpacked tree: lazyblob also inflates and checks it).
set -euo pipefail
bin=${1:-target/release/lazyblob}
size_mib=${2:-512}
command -v mkfs.erofs >/dev/null || { echo "benches/convert.sh: mkfs.erofs missing (erofs-utils)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblob-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

# a tree shaped like an image: many small files, some medium, a few large
tree=$work/tree
mkdir -p "$tree"
if [ -n "${TREE:-}" ]; then
	cp -a "$TREE/." "$tree"
	size_mib=0
fi
head -c $((64 << 20)) /dev/urandom >"$work/seed"
small=$((size_mib * 4))
for i in $(seq 1 "$small"); do
	d=$tree/d$((i % 50))
	mkdir -p "$d"
	dd if="$work/seed" of="$d/f$i" bs=1 count=$(((i * 7919) % 16384)) skip=$((i * 97 % 1000000)) status=none
done
left=$((size_mib - $(du -sm "$tree" | cut -f1)))
k=0
while [ "$left" -gt 0 ]; do
	n=$((left > 64 ? 64 : left))
	mkdir -p "$tree/big"
	head -c $((n << 20)) "$work/seed" >"$tree/big/large$k.bin"
	left=$((left - n))
	k=$((k + 1))
done
data_bytes=$(find "$tree" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')

# an OCI layout holding the tree as one layer
src=$work/src
mkdir -p "$src/blobs/sha256"
tar -C "$tree" --sort=name --owner=0 --group=0 --numeric-owner -cf "$work/layer.tar" .
put() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$src/blobs/sha256/$d"; echo "$d"; }
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
media=application/vnd.oci.image.layer.v1.tar
if [ -n "${LAYER_GZIP:-}" ]; then
	gzip -6 "$work/layer.tar"
	mv "$work/layer.tar.gz" "$work/layer.tar"
	media=$media+gzip
fi
ld=$(put "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"config":{}}' "$diff_id" >"$work/config.json"
cd_=$(put "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"%s","digest":"sha256:%s","size":%d}]}' \
	"$cd_" "$(stat -c %s "$work/config.json")" "$media" "$ld" "$(stat -c %s "$work/layer.tar")" >"$work/manifest.json"
md=$(put "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
	"$md" "$(stat -c %s "$work/manifest.json")" >"$src/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$src/oci-layout"
sync

now() { date +%s.%N; }
t0=$(now)
${PERF:-} "$bin" --log ${LOG:-warn} convert "oci:$src:v1" "oci:$work/dst:v1" >/dev/null 2>${ERR:-/dev/null}
t1=$(now)
mkfs.erofs --quiet "$work/mkfs.img" "$tree" >/dev/null
t2=$(now)
awk -v b="$data_bytes" -v l="$(echo "$t1 - $t0" | bc)" -v m="$(echo "$t2 - $t1" | bc)" 'BEGIN {
	printf "| tool | seconds | MB/s of file data |\n| --- | --- | --- |\n";
	printf "| lazyblob convert (OCI layout, 1 layer, %.0f MB) | %.2f | %.1f |\n", b/1e6, l, b/1e6/l;
	printf "| mkfs.erofs (same unpacked tree) | %.2f | %.1f |\n", m, b/1e6/m;
	printf "ratio lazyblob/mkfs.erofs throughput: %.2f\n", (b/l)/(b/m) }'
