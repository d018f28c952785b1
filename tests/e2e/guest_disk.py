"""The end-to-end guest: a small bootable disk image, built without mounting anything.

Owns: the initramfs of the e2e guest (static busybox, the virtio block modules of the host's
Debian kernel, `guest_init.sh` as /init) and the raw disk image that boots it:

    sector 0          SYSLINUX's MBR boot code and an MBR partition table
    partition 1       FAT16, active: ldlinux.sys (SYSLINUX), syslinux.cfg, the kernel, the initramfs
    partition 2       the data partition the guest's init writes to (type 0x83, left zero)

SeaBIOS loads the MBR from the VM's virtio disk, SYSLINUX loads kernel and initramfs from
partition 1: the volume holds everything that boots, as a golden image does. Built with
mkfs.fat --offset, `syslinux --offset` and mtools (no loop device, no mount).
Debian packages: syslinux, syslinux-common, mtools, dosfstools.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from tests.vm.guest import Kernel, build_initramfs

MiB = 1024 * 1024
SECTOR = 512
DISK_SIZE = 64 * MiB
BOOT_START = 1 * MiB
BOOT_SIZE = 24 * MiB
DATA_START = BOOT_START + BOOT_SIZE
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
TOOLS = (
    ("syslinux", "syslinux"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
)
SYSLINUX_CFG = """\
SERIAL 0 115200
DEFAULT e2e
PROMPT 0
TIMEOUT 0
LABEL e2e
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0 quiet panic=-1
"""


def missing_tools() -> str | None:
    for tool, package in TOOLS:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (Debian package {package})"
    if not MBR_CODE.is_file():
        return f"{MBR_CODE} is missing (Debian package syslinux-common)"
    return None


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise LookupError(f"{name} is not installed")
    return found


def _partition_entry(active: bool, kind: int, start: int, size: int) -> bytes:
    """One 16-byte MBR entry; CHS fields say "use LBA" (0xfe/0xff/0xff), as tools write today."""
    chs = b"\xfe\xff\xff"
    return struct.pack(
        "<B3sB3sII", 0x80 if active else 0, chs, kind, chs, start // SECTOR, size // SECTOR
    )


def mbr(disk_size: int = DISK_SIZE) -> bytes:
    """SYSLINUX's boot code, then the partition table (boot FAT16, data), then 0x55AA."""
    code = MBR_CODE.read_bytes()
    if len(code) > 440:
        raise ValueError(f"{MBR_CODE} is {len(code)} bytes; the MBR has room for 440")
    table = _partition_entry(True, 0x06, BOOT_START, BOOT_SIZE) + _partition_entry(
        False, 0x83, DATA_START, disk_size - DATA_START
    )
    return code.ljust(446, b"\0") + table.ljust(64, b"\0") + b"\x55\xaa"


def build_disk(workdir: Path, kernel: Kernel, disk_size: int = DISK_SIZE) -> Path:
    """The bootable raw image (sparse), at workdir/guest-disk.img."""
    workdir.mkdir(parents=True, exist_ok=True)
    # busybox + virtio block modules + guest_init.sh as /init
    initrd = build_initramfs(
        workdir, kernel, modules=MODULES, init_script=INIT_SCRIPT, variant="-e2e", nbd_client=False
    )
    cfg = workdir / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG)
    disk = workdir / "guest-disk.img"
    tmp = disk.with_name(disk.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(disk_size)
        f.write(mbr(disk_size))
    run = [
        [
            _tool("mkfs.fat"),
            "-F",
            "16",
            "-n",
            "NBDCSIBOOT",
            f"--offset={BOOT_START // SECTOR}",
            str(tmp),
            str(BOOT_SIZE // 1024),
        ],
        [_tool("syslinux"), "--install", f"--offset={BOOT_START}", str(tmp)],
        [
            _tool("mcopy"),
            "-i",
            f"{tmp}@@{BOOT_START}",
            str(kernel.image),
            "::/vmlinuz",
        ],
        [_tool("mcopy"), "-i", f"{tmp}@@{BOOT_START}", str(initrd), "::/initrd.gz"],
        [_tool("mcopy"), "-i", f"{tmp}@@{BOOT_START}", str(cfg), "::/syslinux.cfg"],
    ]
    for argv in run:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr or done.stdout}")
    tmp.rename(disk)
    return disk
