#!/usr/bin/env bash
# Builds the images of a Xen end-to-end scenario from Debian 12 packages plus our binaries:
#   xen       Xen 4.17 (multiboot ELF), vmlinux  the Debian kernel as ELF (dom0 and domU),
#   dom0.cpio busybox, Xen's tools and modules, the domU kernel and initramfs, and by scenario:
#     e2e      our `vtpm serve` in dom0 is the guest's backend (xen-dom0-init.sh);
#     lifecycle  the guest's vTPM across vtpm stops, kills, xl save and restore
#                (xen-lifecycle-dom0-init.sh);
#     stubdom  the manager and the guest's vTPM in stub domains, disks on loop devices through
#              Xen's own hotplug scripts, our `xvtpm` tool (xen-stubdom-dom0-init.sh);
#     service  our Debian package (OUTDIR/xvtpm.deb, built by the test) installed with dpkg,
#              the manager and xvtpmd run as their units run them (xen-service-dom0-init.sh).
#     hvm      as service, plus the HVM parts: Debian's QEMU for Xen (qemu-system-xen), SeaBIOS,
#              hvmloader, and the guest's kernel as a bzImage; the machine's CPU gets SVM with
#              nested paging (xen-hvm-dom0-init.sh).
#     migrate  as hvm, for two hosts on one network (the e1000 driver): an HVM guest moved
#              with `xvtpm migrate` (xen-migrate-dom0-init.sh).
# Cached: rebuilt when an input (packages, scripts, binaries) changes.
# Usage: build-xen.sh OUTDIR BINDIR [e2e|lifecycle|stubdom|service|hvm|migrate]   (BINDIR holds vtpm, vtpmmgr, xvtpm)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-xen.sh OUTDIR BINDIR [e2e|lifecycle|stubdom|service]}
BIN=${2:?usage: build-xen.sh OUTDIR BINDIR [e2e|lifecycle|stubdom|service]}
SCENARIO=${3:-e2e}
VTPM=$BIN/vtpm
case "$SCENARIO" in e2e|lifecycle) BINS=("$VTPM");; stubdom) BINS=("$VTPM" "$BIN/vtpmmgr" "$BIN/xvtpm" "$BIN/xvtpmd");;
    # The package the test built from BINDIR's binaries (scripts/package.sh), in OUTDIR.
    service|hvm|migrate) BINS=("$OUT/xvtpm.deb");;
    *) echo "unknown scenario $SCENARIO" >&2; exit 2;; esac
mkdir -p "$OUT/debs"

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(resolve)
if [ -z "$KPKG" ]; then SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo; $SUDO apt-get update -qq; KPKG=$(resolve); fi
KVER=${KPKG#linux-image-}
XV=4.17
PKGS=(xen-hypervisor-$XV-amd64 xen-utils-$XV xenstore-utils libxenstore4 libxenmisc$XV libxencall1
      libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxentoollog1 libxentoolcore1
      libxendevicemodel1 libxenhypfs1 libyajl2 "$KPKG")
[ "$SCENARIO" = stubdom ] && PKGS+=(xen-utils-common)   # the hotplug scripts (block)
HVM=; case "$SCENARIO" in hvm|migrate) HVM=1;; esac
[ -n "$HVM" ] && PKGS+=(qemu-system-xen qemu-system-data seabios)   # the device model and firmware
stamp="${PKGS[*]} $(cat "$HERE"/build-xen.sh "$HERE"/xen-*.sh "$HERE"/xen-domU.cfg "$HERE"/tpmbench.c "$HERE"/syscall-inject.c "$HERE"/guest-dbus.conf "$HERE"/../../tools/stubdom/* | sha256sum | cut -c1-16) $SCENARIO $(cat "${BINS[@]}" | sha256sum | cut -c1-16) $(dpkg-query -W -f='${Version} ' tpm2-tools busybox-static tpm2-abrmd dbus-daemon)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ]; then exit 0; fi

( cd "$OUT/debs"
  missing=(); for p in "${PKGS[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then apt-get download "${missing[@]}" 2>&1 | grep -v unsandboxed || true; fi )
R="$OUT/root"; rm -rf "$R"; mkdir -p "$R"
for p in "${PKGS[@]}"; do dpkg -x "$(ls "$OUT/debs/${p}"_*.deb | tail -1)" "$R"; done
zcat "$R/boot/xen-$XV-amd64.gz" > "$OUT/xen"
python3 "$HERE/extract-vmlinux.py" "$R/boot/vmlinuz-$KVER" "$OUT/vmlinux"
MODDIR=$R/lib/modules/$KVER
modpath() { find "$MODDIR" -name "$1.ko" | head -1; }
copy_libs() { # binary stage [extra library dir]
    LD_LIBRARY_PATH="$R/usr/lib/x86_64-linux-gnu" ldd "$1" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r l; do
        [ -e "$l" ] || continue
        case "$l" in /lib64/*) mkdir -p "$2/lib64"; cp -L "$l" "$2/lib64/";;
                     *) mkdir -p "$2/lib/x86_64-linux-gnu"; cp -L "$l" "$2/lib/x86_64-linux-gnu/";; esac
    done
}
stage() { rm -rf "$1"; mkdir -p "$1"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,etc,lib/modules,tmp,run,var,boot}; cp /bin/busybox "$1/bin/busybox"; }
mkcpio() { ( cd "$1" && find . | LC_ALL=C sort | cpio -o -H newc --quiet ); }

# domU: xen-tpmfront and tpm2-tools (one multi-call binary; the device TCTI is dlopen()ed).
S="$OUT/stage-domU"; stage "$S"
cp "$(modpath xen-tpmfront)" "$S/lib/modules/"
install -m 755 "$HERE/xen-domU-init.sh" "$S/init"
tpm2=$(readlink -f "$(command -v tpm2)")
cp "$tpm2" "$S/usr/bin/tpm2"
for t in getrandom pcrextend pcrread createprimary nvdefine nvwrite nvread evictcontrol readpublic flushcontext \
         createpolicy create load unseal getcap sign verifysignature eventlog; do
    ln -sf tpm2 "$S/usr/bin/tpm2_$t"
done
gcc -O2 -static -o "$S/usr/bin/tpmbench" "$HERE/tpmbench.c"
# The guest's resource manager: tpm2-abrmd on a private system bus.
for b in /usr/bin/dbus-daemon /usr/sbin/tpm2-abrmd; do cp "$b" "$S/usr/bin/"; copy_libs "$b" "$S"; done
cp -L /usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0 "$S/lib/x86_64-linux-gnu/"
copy_libs /usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0 "$S"
cp "$HERE/guest-dbus.conf" "$S/etc/dbus.conf"
printf 'root:x:0:0:root:/:/bin/sh\n' > "$S/etc/passwd"; printf 'root:x:0:\n' > "$S/etc/group"
copy_libs "$tpm2" "$S"
for l in libtss2-tcti-device.so.0 libtss2-tctildr.so.0; do cp -L "/usr/lib/x86_64-linux-gnu/$l" "$S/lib/x86_64-linux-gnu/"; done
copy_libs /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0 "$S"
# Xen's xenstore client: what a hostile guest may try on dom0's part of xenstore.
cp "$R/usr/bin/xenstore" "$S/usr/bin/xenstore"; copy_libs "$R/usr/bin/xenstore" "$S"
for t in read write; do ln -sf xenstore "$S/usr/bin/xenstore-$t"; done
mkcpio "$S" | gzip -1 > "$OUT/domU.cpio.gz"

# dom0: Xen's tools, our vtpm, the guest.
S="$OUT/stage-dom0"; stage "$S"
for m in xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc; do cp "$(modpath $m)" "$S/lib/modules/"; done
for b in xl xenstored xenconsoled xen-init-dom0; do cp "$R/usr/lib/xen-$XV/bin/$b" "$S/usr/sbin/$b"; copy_libs "$R/usr/lib/xen-$XV/bin/$b" "$S"; done
# xl save / restore / migrate run libxl's helper from where the package puts it.
mkdir -p "$S/usr/lib/xen-$XV/bin"
cp "$R/usr/lib/xen-$XV/bin/libxl-save-helper" "$S/usr/lib/xen-$XV/bin/"; copy_libs "$R/usr/lib/xen-$XV/bin/libxl-save-helper" "$S"
cp "$R/usr/bin/xenstore" "$S/usr/bin/xenstore"; copy_libs "$R/usr/bin/xenstore" "$S"
for t in exists list ls read rm write; do ln -sf xenstore "$S/usr/bin/xenstore-$t"; done
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$S/lib/x86_64-linux-gnu/"   # glibc dlopen()s it (pthread_cancel)
mkdir -p "$S/etc/xen" "$S/var/lib/xen" "$S/var/log/xen"
: > "$S/etc/xen/xl.conf"
cp "$OUT/vmlinux" "$S/boot/vmlinux-domU"
cp "$OUT/domU.cpio.gz" "$S/boot/domU.cpio.gz"
install -m 644 "$HERE/xen-dom0-common.sh" "$S/lib/xen-dom0-common.sh"
if [ -n "$HVM" ]; then
    # HVM: Debian's device model (its keymap, linuxboot for xl's kernel=), SeaBIOS and
    # hvmloader where libxl looks for them, and the guest's kernel as QEMU loads it.
    Q=/usr/libexec/xen-qemu-system-i386
    mkdir -p "$S/usr/libexec" "$S/usr/share/qemu/keymaps" "$S/usr/share/seabios" "$S/usr/lib/xen-$XV/boot"
    cp "$R$Q" "$S$Q"; copy_libs "$R$Q" "$S"
    cp "$R/usr/share/qemu/keymaps/en-us" "$S/usr/share/qemu/keymaps/"
    cp "$R/usr/share/qemu/linuxboot.bin" "$R/usr/share/qemu/linuxboot_dma.bin" "$S/usr/share/qemu/"
    cp "$R/usr/share/seabios/bios-256k.bin" "$S/usr/share/seabios/"
    cp "$R/usr/lib/xen-$XV/boot/hvmloader" "$S/usr/lib/xen-$XV/boot/"
    cp "$R/boot/vmlinuz-$KVER" "$S/boot/vmlinuz-domU"
    echo "qemu64,+svm,+npt" > "$OUT/cpu"
fi
[ "$SCENARIO" = migrate ] && cp "$(modpath e1000)" "$S/lib/modules/"
if [ "$SCENARIO" = service ] || [ -n "$HVM" ]; then
    # The package, and dpkg to install it (its database empty: the libraries the package
    # depends on are files here, copied from this machine's Debian 12).
    mkdir -p "$S/root"; cp "$OUT/xvtpm.deb" "$S/root/xvtpm.deb"
    for b in /usr/bin/dpkg /usr/bin/dpkg-deb /usr/bin/dpkg-query /usr/sbin/start-stop-daemon; do
        cp "$b" "$S/usr/bin/"; copy_libs "$b" "$S"
    done
    mkdir -p "$S/sbin"; cp /sbin/ldconfig "$S/sbin/ldconfig"
    X=$(mktemp -d); dpkg-deb -x "$OUT/xvtpm.deb" "$X"
    for b in "$X"/usr/bin/*; do copy_libs "$b" "$S"; done; rm -rf "$X"
    # busybox has no getent, and its addgroup takes other options: the group the postinst
    # would add is there already (tools/tests/package.rs covers addgroup in a Debian root).
    printf '#!/bin/sh\ngrep -q "^$2:" /etc/$1\n' > "$S/usr/bin/getent"; chmod 755 "$S/usr/bin/getent"
    printf 'root:x:0:0:root:/root:/bin/sh\nxvtpm:x:100:101::/nonexistent:/bin/false\n' > "$S/etc/passwd"
    printf 'root:x:0:\nxvtpm:x:101:\n' > "$S/etc/group"
    install -m 755 "$HERE/xen-$SCENARIO-dom0-init.sh" "$S/init"
    # The sandbox checks make a vtpm's thread call what its filter forbids.
    gcc -O2 -static -o "$S/usr/bin/syscall-inject" "$HERE/syscall-inject.c"
elif [ "$SCENARIO" != stubdom ]; then
    strip -o "$S/usr/sbin/vtpm" "$VTPM"; copy_libs "$VTPM" "$S"
    cp "$HERE/xen-domU.cfg" "$S/etc/xen/domU.cfg"
    case "$SCENARIO" in e2e) init=xen-dom0-init.sh;; lifecycle) init=xen-lifecycle-dom0-init.sh;; esac
    install -m 755 "$HERE/$init" "$S/init"
else
    # The stub domains' images, as an operator installs them.
    mkdir -p "$OUT/stubdom/debs"; ln -f "$OUT"/debs/"$KPKG"_*.deb "$OUT/stubdom/debs/" 2>/dev/null || true
    bash "$HERE/../../tools/stubdom/build-images.sh" "$OUT/stubdom" "$BIN"
    mkdir -p "$S/usr/lib/xvtpm"
    cp "$OUT/stubdom/vmlinux" "$OUT"/stubdom/*.cpio.xz "$S/usr/lib/xvtpm/"
    strip -o "$S/usr/sbin/xvtpm" "$BIN/xvtpm"; copy_libs "$BIN/xvtpm" "$S"
    strip -o "$S/usr/sbin/xvtpmd" "$BIN/xvtpmd"; copy_libs "$BIN/xvtpmd" "$S"
    for m in xen-blkback loop; do cp "$(modpath $m)" "$S/lib/modules/"; done
    # Xen's block hotplug script puts file-backed disks on loop devices; it needs bash,
    # util-linux's losetup and flock. mkfs.ext4 formats the vTPM domains' disks.
    cp -a "$R/etc/xen/scripts" "$S/etc/xen/"
    for b in /usr/bin/bash /usr/sbin/losetup /usr/bin/flock /usr/sbin/mke2fs; do
        cp "$b" "$S/usr/bin/"; copy_libs "$b" "$S"
    done
    ln -sf mke2fs "$S/usr/bin/mkfs.ext4"; ln -sf /usr/bin/bash "$S/bin/bash"
    install -m 755 "$HERE/xen-stubdom-dom0-init.sh" "$S/init"
fi
mkcpio "$S" > "$OUT/dom0.cpio"
rm -rf "$R" "$OUT/stage-domU" "$OUT/stage-dom0"
echo "$stamp" > "$OUT/stamp"
