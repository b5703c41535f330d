#!/bin/sh
# install-host-service.sh - run by the DaemonSet's init container: installs lazyblob on the
# node as a systemd service, so the daemon and its guard live outside the pod.
#
# Why: in a pod the daemon is PID 1 of its container, and a rolling update, an OOM kill or a
# crash of the pod kills every process of the container, the guard included; with the guard
# gone the kernel fd closes, and fanotify mounts read holes as zeros (cachefiles ones fail).
# A host service with KillMode=process keeps the guard across any restart of the daemon, and
# a restart is a takeover: readers pause, none fails (docs/design.md).
#
# Idempotent: the binary, config and unit are written only when they differ (atomically,
# root-only where they hold configuration), and the service is restarted only then. A second
# run with the same inputs changes nothing.
#
# `install-host-service.sh uninstall` stops and disables the service and removes what the
# install wrote (the binary, config and unit; the state and cache directories stay, remove
# them by hand once nothing uses them). Drain the node's lazyblob workloads first: a stop
# with busy mounts keeps serving them until they are gone.
#
# Environment: HOST_ROOT (the node's / mounted into the container, default /host),
# LAZYBLOB_BIN (the binary to install, default the one in the image), LAZYBLOB_CONFIG (the
# config to install, default /etc/lazyblob/lazyblob.toml), SYSTEMCTL (how to reach the host's
# systemd, default: nsenter into PID 1's namespaces).
set -eu

host=${HOST_ROOT:-/host}
bin=${LAZYBLOB_BIN:-/usr/local/bin/lazyblob}
config=${LAZYBLOB_CONFIG:-/etc/lazyblob/lazyblob.toml}
systemctl=${SYSTEMCTL:-nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl}
changed=0

if [ "${1:-install}" = uninstall ]; then
	if [ -f "$host/etc/systemd/system/lazyblob.service" ]; then
		$systemctl disable --now lazyblob.service
		rm -f "$host/etc/systemd/system/lazyblob.service" "$host/opt/lazyblob/bin/lazyblob" \
			"$host/etc/lazyblob/lazyblob.toml"
		rmdir "$host/opt/lazyblob/bin" "$host/opt/lazyblob" 2>/dev/null || true
		$systemctl daemon-reload
		echo "install-host-service: lazyblob removed from the node"
	else
		echo "install-host-service: not installed"
	fi
	exit 0
fi

# install SRC DST MODE: copy SRC to DST (atomically) if the bytes differ
install_file() {
	if [ -f "$2" ] && cmp -s "$1" "$2"; then
		return 0
	fi
	mkdir -p "$(dirname "$2")"
	tmp="$2.new.$$"
	cp "$1" "$tmp"
	chmod "$3" "$tmp"
	mv -f "$tmp" "$2"
	echo "install-host-service: updated $2"
	changed=1
}

unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
cat >"$unit" <<'EOF'
[Unit]
Description=lazyblob: lazy-loading EROFS images from OCI registries (installed by its DaemonSet)
After=network-online.target local-fs.target
Wants=network-online.target
Before=containerd.service

[Service]
Type=simple
ExecStart=/opt/lazyblob/bin/lazyblob daemon --config /etc/lazyblob/lazyblob.toml --log-json
# only the daemon gets signals: its guard survives a crash and a restart of the daemon and
# holds readers for the next one
KillMode=process
Restart=always
RestartSec=1
TimeoutStopSec=60
LimitNOFILE=1048576
RuntimeDirectory=lazyblob
RuntimeDirectoryPreserve=yes
StateDirectory=lazyblob
CacheDirectory=lazyblob

[Install]
WantedBy=multi-user.target
EOF

install_file "$bin" "$host/opt/lazyblob/bin/lazyblob" 0755
install_file "$config" "$host/etc/lazyblob/lazyblob.toml" 0600
install_file "$unit" "$host/etc/systemd/system/lazyblob.service" 0644

if [ "$changed" = 1 ]; then
	$systemctl daemon-reload
	$systemctl enable lazyblob.service
	# a restart of a running daemon is a takeover (its guard holds the readers meanwhile)
	$systemctl restart lazyblob.service
	echo "install-host-service: lazyblob (re)started on the node"
else
	$systemctl start lazyblob.service
	echo "install-host-service: nothing changed"
fi
