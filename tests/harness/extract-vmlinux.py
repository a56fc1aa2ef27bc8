#!/usr/bin/env python3
"""Writes the uncompressed ELF kernel found inside an xz-compressed bzImage (Debian's kernels).
Xen's PV domain builders take the ELF directly, which saves a slow decompression under TCG."""
import lzma
import sys

data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
while start >= 0:
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        elf = b""
    if elf.startswith(b"\x7fELF"):
        open(sys.argv[2], "wb").write(elf)
        sys.exit(0)
    start = data.find(b"\xfd7zXZ\x00", start + 1)
sys.exit("no xz-compressed ELF kernel in " + sys.argv[1])
