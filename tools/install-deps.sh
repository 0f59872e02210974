#!/usr/bin/env bash
# Install what blocktrack's build, tests, kernel lab and benchmarks need: Debian packages with
# apt-get, Python packages with pip. Safe to run again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
debs=(
  gcc make cpio kmod util-linux            # build, losetup, initramfs
  libxxhash-dev                            # the C core's chunk digests (XXH3-128, csrc/bt_digest.c)
  qemu-system-x86 qemu-utils               # the kernel lab; QEMU as a wire-format peer; qemu-img/qemu-io/qemu-nbd
  busybox-static                           # the lab's initramfs
  lvm2 dmsetup thin-provisioning-tools     # LVM, device-mapper, era_invalidate/era_dump (used inside the lab)
  nbd-client nbdkit libnbd-bin             # kernel NBD client, NBD peers (nbdinfo, nbdcopy)
  e2fsprogs fio udev iproute2 time         # filesystems and udevd in the lab, benchmarks (GNU time for peak RSS)
  openssh-server openssh-client openssl    # the ssh transport's test (a real sshd on loopback), test certificates
)
missing=()
for pkg in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Always refresh the lists: the kernel lab asks apt which linux-image-amd64 is current.
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
python3 -m pip install -q --disable-pip-version-check "cffi>=1.15" "ioctl-opt>=1.2" "xxhash>=3" "pyudev>=0.22" \
  "pytest>=7" "hypothesis>=6" "pytest-timeout" setuptools wheel
