# Sourced by the VM image builders: Debian 12's kernel and the pieces of a busybox initramfs.

# The linux-image-<version> package linux-image-amd64 points at (after an apt-get update if
# the lists are empty).
kernel_package() {
    local resolve='apt-cache depends linux-image-amd64 2>/dev/null | awk "/Depends: linux-image-[0-9]/{print \$2; exit}"'
    local k
    k=$(eval "$resolve")
    if [ -z "$k" ]; then
        local sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq && k=$(eval "$resolve")
    fi
    [ -n "$k" ] || { echo "cannot resolve linux-image-amd64 (apt-get update?)" >&2; return 1; }
    echo "$k"
}

# fetch_kernel OUT KPKG: downloads the package (cached in OUT/debs), unpacks its /boot into
# OUT/kroot and copies the kernel to OUT/vmlinuz.
fetch_kernel() {
    local out=$1 kpkg=$2
    mkdir -p "$out/debs"
    ( cd "$out/debs" && { ls "${kpkg}"_*.deb >/dev/null 2>&1 || apt-get download "$kpkg" 2>&1 | grep -v unsandboxed || true; } )
    local deb
    deb=$(ls "$out/debs/${kpkg}"_*.deb | tail -1)
    rm -rf "$out/kroot" && mkdir -p "$out/kroot"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$out/kroot" ./boot
    cp "$out"/kroot/boot/vmlinuz-* "$out/vmlinuz"
}

# new_stage STAGE: an initramfs tree with the static busybox.
new_stage() {
    local stage=$1
    rm -rf "$stage" && mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib64,usr/lib/x86_64-linux-gnu}
    cp /bin/busybox "$stage/bin/busybox"
    file -L "$stage/bin/busybox" | grep -q 'statically linked' || { echo "busybox is not static (install busybox-static)" >&2; return 1; }
    cp /lib64/ld-linux-x86-64.so.2 "$stage/lib64/"
    ln -sf usr/lib "$stage/lib"
}

# copy_libs STAGE FILE...: the shared libraries FILE... need, into the stage.
copy_libs() {
    local stage=$1; shift
    local l
    for l in $( (for f in "$@"; do ldd "$f"; done) | awk '/=>/ {print $3}' | sort -u); do
        cp "$(readlink -f "$l")" "$stage/usr/lib/x86_64-linux-gnu/$(basename "$l")"
    done
}

# pack_stage STAGE OUT_FILE: the gzip'd cpio initramfs.
pack_stage() {
    ( cd "$1" && find . | cpio -o -H newc --quiet | gzip -1 > "$2" )
}
