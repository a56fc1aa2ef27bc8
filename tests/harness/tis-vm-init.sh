#!/bin/busybox sh
# init of the MMIO driver VM: run tpm-mmio-check against the TPM QEMU emulates, power off.
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "XVTPM-TIS: kernel=$(uname -r)"
# The kernel's drivers must not own the device: report what it bound.
echo "XVTPM-TIS: kernel-tpm-devices=$(ls /sys/class/tpm 2>/dev/null | tr '\n' ' ')"
echo "XVTPM-TIS: iomem=$(grep -i 'fed40000' /proc/iomem | tr -s ' ' | tr '\n' ';')"
RUST_LOG=info tpm-mmio-check 2>&1
echo "XVTPM-TIS: exit=$?"
echo "XVTPM-TIS: DONE"
poweroff -f
