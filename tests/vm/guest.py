"""Boot throwaway qemu-system-x86_64 guests (TCG) that run one shell script against our NBD server.

Owns: finding the host's Debian kernel (/boot/vmlinuz-<release> with /lib/modules/<release>),
building a small busybox initramfs once (virtio, virtio-net, nbd and qemu_fw_cfg modules plus
Debian's nbd-client and its shared libraries, and `guest_init.sh` as /init), and booting a guest
with a script passed through fw_cfg, optional `-drive` arguments and a guestfwd that maps guest
10.0.2.100:10809 onto an NBD server on host 127.0.0.1. Returns the script's exit code and the
serial console text. A guest never reaches anything but that one forwarded port: user-mode
networking runs with restrict=on.

Nothing here fakes a part: the guest's kernel NBD driver, nbd-client and QEMU's NBD block driver
are the real ones the project must interoperate with.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
GUEST_NBD_ADDR = "10.0.2.100"
GUEST_NBD_PORT = 10809
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
# Modules the guest loads (their dependencies, from modules.dep, come along in load order).
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "nbd",
    "qemu_fw_cfg",
)
# A guest that runs the host's own tree (tests/vm/guest_init_hostroot.sh) also needs 9p over
# virtio, overlayfs, the filesystems the node plugin makes, and dm-crypt.
HOSTROOT_MODULES = (
    *MODULES,
    "9pnet_virtio",
    "9p",
    "overlay",
    "crc32c_generic",
    "ext4",
    "xfs",
    # Encrypted volumes (LUKS2, aes-xts-plain64; docs/csi-node.md): device-mapper and
    # dm-crypt, the XTS and ECB templates around the built-in AES, and the kernel crypto API
    # for user space that cryptsetup encrypts keyslots with.
    "dm_mod",
    "dm_crypt",
    "ecb",
    "xts",
    "af_alg",
    "algif_skcipher",
)
HOSTROOT_INIT_SCRIPT = Path(__file__).with_name("guest_init_hostroot.sh")
EXIT_MARKER = re.compile(r"^NBDCSI-GUEST-EXIT rc=(\d+)\s*$", re.MULTILINE)
# What a guest script asks of the host while it runs (see GuestImage.run_following).
REQUEST = re.compile(r"^NBDCSI-REQUEST (\S+)\s*$", re.MULTILINE)
# fw_cfg names live under opt/ and must be unique to the project (QEMU docs, "fw_cfg").
FW_CFG_PREFIX = "opt/nbdcsi/"


@dataclass(frozen=True)
class Kernel:
    release: str
    image: Path
    modules: Path


@dataclass(frozen=True)
class GuestResult:
    """What one boot produced. `exit_code` is None when the end marker never appeared."""

    exit_code: int | None
    output: str
    timed_out: bool
    qemu_returncode: int | None

    def tagged(self, tag: str) -> dict[str, str]:
        """Lines `TAG KEY VALUE` printed by the guest script, as {KEY: VALUE}."""
        found: dict[str, str] = {}
        for m in re.finditer(rf"^{re.escape(tag)} (\S+) (\S+)\s*$", self.output, re.MULTILINE):
            found[m.group(1)] = m.group(2)
        return found

    def explain(self, tail: int = 60) -> str:
        lines = self.output.splitlines()[-tail:]
        head = (
            f"guest exit={self.exit_code} timed_out={self.timed_out} "
            f"qemu rc={self.qemu_returncode}; last {len(lines)} console lines:"
        )
        return "\n".join([head, *lines])


# -- prerequisites -------------------------------------------------------------------------------


def find_kernel(modules_root: Path = Path("/lib/modules"), boot: Path = Path("/boot")) -> Kernel:
    """The newest release with both a kernel image and an nbd module. Raises LookupError."""
    if not modules_root.is_dir():
        raise LookupError(f"{modules_root} does not exist (install linux-image-amd64)")
    candidates = []
    for mod_dir in modules_root.iterdir():
        image = boot / f"vmlinuz-{mod_dir.name}"
        if (mod_dir / "modules.dep").is_file() and image.is_file() and os.access(image, os.R_OK):
            candidates.append(Kernel(mod_dir.name, image, mod_dir))
    if not candidates:
        raise LookupError(
            f"no kernel with both {boot}/vmlinuz-<release> and "
            f"{modules_root}/<release>/modules.dep (install linux-image-amd64)"
        )
    return max(candidates, key=lambda k: _release_key(k.release))


def _release_key(release: str) -> list[tuple[int, str]]:
    """6.1.0-56-amd64 sorts after 6.1.0-9-amd64: numbers compare as numbers."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", release)]


def _which_sbin(tool: str) -> str | None:
    """shutil.which, also looking in the sbin directories a non-root PATH may lack."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def missing_prerequisites() -> str | None:
    """Why the VM tests cannot run on this machine, or None when they can."""
    for tool, package in (
        (QEMU, "qemu-system-x86"),
        ("nbd-client", "nbd-client"),
        ("socat", "socat"),
        ("cpio", "cpio"),
        ("busybox", "busybox-static"),
    ):
        if _which_sbin(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    try:
        find_kernel()
    except LookupError as exc:
        return str(exc)
    return None


# -- initramfs -----------------------------------------------------------------------------------


def _module_table(kernel: Kernel) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as {name: (relative path, [dependency names])}; names use underscores."""

    def name_of(rel: str) -> str:
        return Path(rel).name.split(".ko")[0].replace("-", "_")

    table: dict[str, tuple[str, list[str]]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        target, _, deps = line.partition(":")
        table[name_of(target)] = (target, [name_of(d) for d in deps.split()])
    return table


def _builtin_modules(kernel: Kernel) -> set[str]:
    path = kernel.modules / "modules.builtin"
    if not path.is_file():
        return set()
    return {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in path.read_text().splitlines()
        if line
    }


def module_load_order(kernel: Kernel, wanted: Sequence[str] = MODULES) -> list[tuple[str, Path]]:
    """(name, file) for every loadable module needed, each after its dependencies."""
    table, builtin = _module_table(kernel), _builtin_modules(kernel)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in table:
            if name in builtin:
                return
            raise LookupError(f"kernel {kernel.release} has no module {name}")
        rel, deps = table[name]
        for dep in deps:
            visit(dep)
        order.append((name, kernel.modules / rel))

    for name in wanted:
        visit(name)
    return order


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed on the host so the guest's busybox insmod needs no codec."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst") and shutil.which("zstd"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    raise LookupError(f"cannot decompress kernel module {path}")


def _copy_with_libs(binary: Path, root: Path) -> None:
    """Copy an executable and every shared library `ldd` names to the same paths under root."""
    files = [binary]
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if ldd.returncode == 0:  # static binaries make ldd fail: nothing more to copy
        files += [Path(p) for p in re.findall(r"(/\S+) \(0x", ldd.stdout)]
    for src in files:
        dest = root / src.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src.resolve(), dest)


def build_initramfs(
    cache_dir: Path,
    kernel: Kernel,
    *,
    modules: Sequence[str] = MODULES,
    init_script: Path = INIT_SCRIPT,
    variant: str = "",
    nbd_client: bool = True,
) -> Path:
    """Build (once per cache_dir and variant) a gzip'd newc initramfs and return its path:
    busybox, the kernel `modules` (with their dependencies, in load order), `init_script` as
    /init, and Debian's nbd-client unless `nbd_client` is False.

    gzip level 1: under TCG, loading twice the bytes costs more than decompressing them.
    """
    out = cache_dir / f"initramfs-{kernel.release}{variant}.cpio.gz"
    if out.is_file():
        return out
    root = cache_dir / f"root{variant}"
    if root.exists():
        shutil.rmtree(root)
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "lib/modules"):
        (root / d).mkdir(parents=True)

    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    shutil.copy2(busybox.resolve(), root / "bin/busybox")
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (root / "bin/sh").unlink(missing_ok=True)
    (root / "bin/sh").symlink_to("busybox")

    if nbd_client:
        # Debian's nbd-client, at its host path (the guest's PATH has /usr/sbin, /sbin and
        # /usr/bin).
        found = _which_sbin("nbd-client")
        if found is None:
            raise LookupError("nbd-client is not installed")
        _copy_with_libs(Path(found), root)

    names = []
    for name, path in module_load_order(kernel, modules):
        (root / "lib/modules" / f"{name}.ko").write_bytes(_read_module(path))
        names.append(name)
    (root / "lib/modules/load-order").write_text("\n".join(names) + "\n")

    init = root / "init"
    shutil.copy2(init_script, init)
    init.chmod(0o755)

    entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=root,
        input="\n".join(entries).encode(),
        capture_output=True,
        check=True,
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(gzip.compress(archive.stdout, compresslevel=1))
    tmp.rename(out)
    shutil.rmtree(root)
    return out


# -- booting -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestImage:
    """A kernel plus the initramfs built for it: everything needed to boot a guest."""

    kernel: Kernel
    initramfs: Path

    def run(
        self,
        script: str,
        workdir: Path,
        *,
        nbd_port: int | None = None,
        drives: Sequence[str] = (),
        files: Mapping[str, Path] | None = None,
        memory_mb: int = 384,
        cpus: int = 1,
        timeout: float = 180.0,
        host_root: bool = False,
    ) -> GuestResult:
        """Boot, run `script` with sh inside the guest, power off; never longer than timeout.

        nbd_port: host 127.0.0.1 port that guest 10.0.2.100:10809 forwards to (one socat per
        guest connection, so reconnects and multiple connections work).
        drives: values for `-drive` (e.g. an nbd:// URI QEMU itself connects to).
        files: read-only data the script finds as /run/nbdcsi/NAME (its working directory), a
        block device padded to 512 bytes. Data goes in as a virtio disk, not through fw_cfg:
        reading fw_cfg from sysfs moves only tens of KiB per second under TCG.
        host_root: share the host's / read-only over 9p; the image's init (built with
        build_hostroot_initramfs) runs the script with bash inside it, over a tmpfs overlay,
        so the guest runs the host's Python and the project's own code.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        cmd_file = workdir / "guest-cmd.sh"
        cmd_file.write_text(script)
        console = workdir / "console.log"
        disks = {
            name: _padded_copy(path, workdir / f"file-{name}.img")
            for name, path in (files or {}).items()
        }
        argv = self.qemu_argv(
            cmd_file,
            nbd_port=nbd_port,
            drives=drives,
            files=disks,
            memory_mb=memory_mb,
            cpus=cpus,
            forward_log=workdir / "guestfwd.log",
        )
        if host_root:
            argv += [
                "-fsdev",
                "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device",
                "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            ]
        (workdir / "qemu-argv.txt").write_text("\n".join(argv) + "\n")
        with open(console, "wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                # Only qemu itself: the socat children guestfwd spawned read from qemu and
                # exit on their own once it is gone.
                proc.kill()
                proc.wait()
        output = console.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        markers = EXIT_MARKER.findall(output)
        return GuestResult(
            exit_code=int(markers[-1]) if markers else None,
            output=output,
            timed_out=timed_out,
            qemu_returncode=proc.returncode,
        )

    def run_following(
        self,
        script: str,
        workdir: Path,
        handlers: Mapping[str, Callable[[], object]],
        *,
        nbd_port: int | None = None,
        memory_mb: int = 384,
        timeout: float = 180.0,
        host_root: bool = False,
    ) -> tuple[GuestResult, list[str]]:
        """`run`, acting on the `NBDCSI-REQUEST WHAT` lines the guest prints while it runs:
        handlers[WHAT]() once per line, in the order printed (a guest waits for the host's
        answer through its own means, e.g. an NBD size change). Returns the result and the
        requests handled; an unknown request fails the caller."""
        done = threading.Event()
        outcome: list[GuestResult] = []

        def boot() -> None:
            try:
                outcome.append(
                    self.run(
                        script,
                        workdir,
                        nbd_port=nbd_port,
                        memory_mb=memory_mb,
                        timeout=timeout,
                        host_root=host_root,
                    )
                )
            finally:
                done.set()

        runner = threading.Thread(target=boot)
        runner.start()
        try:
            handled = follow(workdir / "console.log", done, handlers)
        finally:
            runner.join()
        return outcome[0], handled

    def qemu_argv(
        self,
        cmd_file: Path,
        *,
        nbd_port: int | None,
        drives: Sequence[str],
        files: Mapping[str, Path],
        memory_mb: int,
        cpus: int,
        forward_log: Path | None = None,
    ) -> list[str]:
        netdev = "user,id=n0,restrict=on"
        if nbd_port is not None:
            # The cmd form runs socat per guest connection; the chardev form connects only once.
            netdev += (
                f",guestfwd=tcp:{GUEST_NBD_ADDR}:{GUEST_NBD_PORT}"
                f"-cmd:{guestfwd_command(nbd_port, forward_log)}"
            )
        argv = [
            QEMU,
            "-accel",
            "tcg",
            "-m",
            str(memory_mb),
            "-smp",
            str(cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(self.kernel.image),
            "-initrd",
            str(self.initramfs),
            "-append",
            "console=ttyS0 quiet panic=-1",
            "-netdev",
            netdev,
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-fw_cfg",
            f"name={FW_CFG_PREFIX}cmd,file={cmd_file}",
        ]
        for drive in drives:
            argv += ["-drive", drive]
        for i, (name, path) in enumerate(files.items()):
            # The guest's init links /run/nbdcsi/NAME to the virtio disk whose serial is NAME.
            if name == "cmd" or not re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", name):
                raise ValueError(f"bad guest file name {name!r}")
            argv += [
                "-drive",
                f"file={path},format=raw,if=none,id=file{i},readonly=on",
                "-device",
                f"virtio-blk-pci,drive=file{i},serial={name}",
            ]
        return argv


def follow(
    console: Path, done: threading.Event, handlers: Mapping[str, Callable[[], object]]
) -> list[str]:
    """Act on each NBDCSI-REQUEST the guest prints, once, until the guest is done."""
    handled: list[str] = []
    while not done.wait(0.1):
        text = console.read_text(errors="replace") if console.exists() else ""
        for what in REQUEST.findall(text)[len(handled) :]:
            handled.append(what)
            action = handlers.get(what)
            assert action is not None, f"guest asked for unknown {what!r}"
            action()
    return handled


def guestfwd_command(nbd_port: int, log: Path | None = None) -> str:
    """The command QEMU's user-mode network runs for each guest connection to the NBD address.

    QEMU hands that command the connection as stdin, stdout *and* stderr, so anything socat
    logs would enter the guest's NBD stream (a broken connection made socat log an error whose
    timestamp the guest's kernel read as a reply: "nbd0: Wrong magic (0x32303236)", ASCII
    "2026"). socat logs to `log` (appending; kept for diagnosis) or to /dev/null instead.
    QEMU splits the command like a shell, without running one, and ends it at a comma.
    """
    target = str(log) if log is not None else os.devnull
    if "," in target:
        raise ValueError(f"guestfwd log path may not contain a comma: {target!r}")
    return f"socat -lf {shlex.quote(target)} - TCP:127.0.0.1:{nbd_port}"


def build_hostroot_initramfs(cache_dir: Path, kernel: Kernel) -> Path:
    """The initramfs of guests that run the host's tree (GuestImage.run(host_root=True))."""
    return build_initramfs(
        cache_dir,
        kernel,
        modules=HOSTROOT_MODULES,
        init_script=HOSTROOT_INIT_SCRIPT,
        variant="-hostroot",
    )


def _padded_copy(src: Path, dest: Path) -> Path:
    """A copy of src padded with zeros to a whole number of 512-byte sectors."""
    data = src.read_bytes()
    dest.write_bytes(data + bytes(-len(data) % 512))
    return dest
