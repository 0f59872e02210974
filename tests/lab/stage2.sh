# Stage 2 of the kernel lab, run by PID 1 after the initramfs switched root to the host's root (read-only
# 9p + tmpfs overlay). The harness copies this file into the lab share, which the init mounts at /run/lab, beside
# /run/lab/config (shell assignments: LAB_MODE, LAB_CWD, LAB_KVER, LAB_MODULES_DIR, LAB_TTY_ROWS/COLS,
# exported environment) and /run/lab/cmd (the command for `sh -c`).
#
# Results: /run/lab/status (the command's exit status), /run/lab/dmesg.txt, /run/lab/results/ (for the
# command, as $BLOCKTRACK_LAB_OUT). Markers on the console for the harness: @@LAB:READY@@ when the command
# starts, @@LAB:DONE:<status>@@ when it ended.
set -u
LAB=/run/lab
. "$LAB/config"

log() { echo "lab-stage2: $*"; }
[ -n "${BLOCKTRACK_LAB_TRACE:-}" ] && log "start $(cut -d' ' -f1 /proc/uptime)"

mkdir -p /run/lock /run/lvm /run/udev /var/lock 2>/dev/null
hostname blocktrack-lab 2>/dev/null
ip link set lo up 2>/dev/null || log "could not bring up lo"

# The whole module tree of the lab kernel, for modprobe of anything not in the initramfs (udev's kmod
# builtin, and the kernel's request_module, e.g. ext4 at mount).
if [ -n "${LAB_MODULES_DIR:-}" ] && [ -d "$LAB_MODULES_DIR" ]; then
	mkdir -p "/lib/modules/$LAB_KVER" && mount --bind "$LAB_MODULES_DIR" "/lib/modules/$LAB_KVER"
fi

# udev, as on a real host: /dev/mapper/NAME, /dev/VG/LV, dm and lvm udev cookies. The flag file tells a
# command that did not wait (test-kernel) when the coldplug has been queued, so that `udevadm settle` is
# meaningful from then on.
UDEV_FLAG=/run/blocktrack-lab/udev-triggered
export BLOCKTRACK_LAB_UDEV_FLAG="$UDEV_FLAG"
mkdir -p /run/blocktrack-lab
start_udev() {
	if [ -x /lib/systemd/systemd-udevd ]; then
		/lib/systemd/systemd-udevd --daemon || log "systemd-udevd failed to start"
		[ -n "${BLOCKTRACK_LAB_TRACE:-}" ] && log "udevd started $(cut -d' ' -f1 /proc/uptime)"
		# Coldplug only the disks (udevd handles every later event in full): replaying all ~280 devices
		# took ~9 s under TCG; unattached loop/nbd devices get a "change" event when they are attached.
		udevadm trigger --type=devices --action=add --subsystem-match=block --sysname-match='vd*'
		[ -n "${BLOCKTRACK_LAB_TRACE:-}" ] && log "triggered $(cut -d' ' -f1 /proc/uptime)"
	else
		log "WARNING: /lib/systemd/systemd-udevd missing (apt-get install udev): no /dev/mapper nodes"
	fi
	touch "$UDEV_FLAG"
}
if [ "${LAB_SETTLE:-1}" = 1 ]; then
	start_udev
	udevadm settle --timeout=60 || log "udevadm settle timed out"
	[ -n "${BLOCKTRACK_LAB_TRACE:-}" ] && log "udev settled $(cut -d' ' -f1 /proc/uptime)"
else
	start_udev &                # test-kernel: pytest starts meanwhile; its conftest waits and settles
fi

# LVM without systemd or dmeventd: locks on tmpfs, no event activation, wait for udev.
mkdir -p /etc/lvm
cat >/etc/lvm/lvmlocal.conf <<'EOF'
global {
	locking_dir = "/run/lock/lvm"
	event_activation = 0
}
activation {
	udev_sync = 1
	udev_rules = 1
	monitoring = 0
}
devices {
	obtain_device_list_from_udev = 1
}
EOF

mkdir -p "$LAB/results"
rm -f "$LAB/status"
cd "$LAB_CWD" || { log "cannot cd to $LAB_CWD"; echo 126 >"$LAB/status"; exit 1; }
dmesg -n "${LAB_CONSOLE_LOGLEVEL:-2}" 2>/dev/null

if [ "$LAB_MODE" = shell ]; then
	stty -F /dev/ttyS0 rows "${LAB_TTY_ROWS:-24}" cols "${LAB_TTY_COLS:-80}" sane 2>/dev/null
	echo "blocktrack kernel lab ($(uname -r)); cwd $LAB_CWD; exit the shell to power off (Ctrl-A X kills qemu)"
	setsid -w -c /bin/bash -i </dev/ttyS0 >/dev/ttyS0 2>&1
	rc=$?
else
	cut -d' ' -f1 /proc/uptime >"$LAB/ready_uptime"
	echo "@@LAB:READY@@"
	sh -c "$(cat "$LAB/cmd")" </dev/null
	rc=$?
fi

echo "$rc" >"$LAB/status"
dmesg >"$LAB/dmesg.txt" 2>/dev/null
[ "$LAB_MODE" = shell ] || echo "@@LAB:DONE:$rc@@"
udevadm control --exit 2>/dev/null
sync
exit 0
