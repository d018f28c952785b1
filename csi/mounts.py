"""Filesystems and mounts on the node: probe, format, mount, bind, unmount, grow, measure.

Owns every subprocess the Node service runs (util-linux `blkid`, `mount`, `umount`;
e2fsprogs `mkfs.ext4`, `resize2fs`; xfsprogs `mkfs.xfs`, `xfs_growfs`) behind `Runner`, and
the reading of /proc/self/mountinfo (what is mounted where, and what still holds a device).
Everything blocking runs in a subprocess or an executor thread, never on the event loop.

Children are started with posix_spawn (glibc: clone + exec, no fork handlers), never with
fork(): uvloop's subprocesses fork, and a fork runs gRPC's at-fork handlers, which crash the
child (SIGSEGV in cygrpc) while other threads are inside gRPC (docs/csi-node.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger("csi.mounts")
T = TypeVar("T")

FILESYSTEMS = ("ext4", "xfs")
DEFAULT_FS = "ext4"


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], code: int, output: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {code}: {output.strip()[-500:]}")
        self.argv = list(argv)
        self.code = code
        self.output = output


# Where the tools live when the plugin's PATH lacks the sbin directories.
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def spawn_and_wait(
    argv: Sequence[str], stdin: bytes | None = None, fd3: bytes | None = None
) -> tuple[int, str]:
    """Run `argv` to completion through posix_spawn; its exit code (negative: the signal) and
    its output (stdout and stderr together). `stdin` and `fd3`: bytes the child reads on that
    descriptor, each from a pipe of its own (a key: never in argv, a file or the environment;
    at most a pipe's buffer, so writing it never waits for the child). Blocking: call it from
    a thread."""
    path = shutil.which(argv[0]) or shutil.which(argv[0], path=_SBIN)
    if path is None:
        return 127, f"{argv[0]}: command not found"
    read_end, write_end = os.pipe()  # both close-on-exec: the child gets them by dup2 only
    inputs: list[tuple[int, int, bytes]] = []  # (child fd, our write end, data)
    actions = []
    for target, data in ((0, stdin), (3, fd3)):
        if data is None:
            continue
        child_end, ours = os.pipe()
        inputs.append((child_end, ours, data))
        actions.append((os.POSIX_SPAWN_DUP2, child_end, target))
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    if stdin is None:
        actions.insert(0, (os.POSIX_SPAWN_DUP2, devnull, 0))
    try:
        pid = os.posix_spawn(
            path,
            list(argv),
            os.environ,
            # Output first: write_end may be fd 3 here, which the fd3 pipe then replaces.
            file_actions=[
                (os.POSIX_SPAWN_DUP2, write_end, 1),
                (os.POSIX_SPAWN_DUP2, write_end, 2),
                *actions,
            ],
        )
    except OSError as exc:
        os.close(read_end)
        for _, ours, _ in inputs:
            os.close(ours)
        return 126, f"{argv[0]}: {exc.strerror or exc}"
    finally:
        os.close(write_end)
        os.close(devnull)
        for child_end, _, _ in inputs:
            os.close(child_end)
    for _, ours, data in inputs:
        try:
            os.write(ours, data)
        except BrokenPipeError:
            pass  # the child exited without reading: its exit code says why
        finally:
            os.close(ours)
    with open(read_end, "rb") as out:
        text = out.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


class Runner:
    """Runs a command to completion; output is kept for the error message. Each command waits
    in a thread of its own pool, so a long mkfs does not hold up the mountinfo reads."""

    def __init__(self, workers: int = 8) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spawn")

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    async def run(
        self,
        *argv: str,
        ok: Sequence[int] = (0,),
        stdin: bytes | None = None,
        fd3: bytes | None = None,
    ) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        code, text = await loop.run_in_executor(self._executor, spawn_and_wait, argv, stdin, fd3)
        if code not in ok:
            raise CommandError(argv, code, text)
        return code, text


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_id: int
    major_minor: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    fs_type: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                major_minor=fields[2],
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fs_type=rest[0],
                source=_unescape(rest[1]),
            )
        )
    return entries


def devtmpfs_root(device: str) -> str:
    """The root a bind mount of `device`'s node shows in mountinfo: its path inside /dev
    (/nbd0; /dm-3 for a /dev/mapper link made by udev, /mapper/NAME for a node made by
    libdevmapper itself)."""
    return "/" + os.path.relpath(os.path.realpath(device), "/dev")


def _same_node(entry: MountEntry, rdev: int) -> bool:
    """A devtmpfs bind mount of another node of the same device (/dev/mapper/NAME made by
    libdevmapper and /dev/dm-N are two nodes of one device)."""
    if entry.root == "/":
        return False
    try:
        st = os.stat(entry.mount_point)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


@dataclass(frozen=True)
class Usage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


class Mounter:
    """The node's filesystem operations. `mountinfo` is a path so tests can read another."""

    def __init__(
        self, runner: Runner | None = None, mountinfo: Path = Path("/proc/self/mountinfo")
    ) -> None:
        self.runner = runner or Runner()
        self.mountinfo = mountinfo
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mounts")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.runner.close()

    async def _thread(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- reading state -------------------------------------------------------------------

    def _entries(self) -> list[MountEntry]:
        return parse_mountinfo(self.mountinfo.read_text())

    async def entries(self) -> list[MountEntry]:
        return await self._thread(self._entries)

    async def mounted_at(self, path: str) -> MountEntry | None:
        """The topmost mount at `path`, or None."""
        real = os.path.realpath(path)
        found = [e for e in await self.entries() if e.mount_point == real]
        return found[-1] if found else None

    def _uses(self, device: str) -> list[tuple[str, MountEntry]]:
        """Mount entries of `device`: ("mounted at", e) for its filesystem, ("bound onto", e)
        for a bind mount of its device node (devtmpfs, root /NAME)."""
        try:
            rdev = os.stat(device).st_rdev
        except FileNotFoundError:
            return []
        number = f"{os.major(rdev)}:{os.minor(rdev)}"
        root = devtmpfs_root(device)
        uses = []
        for e in self._entries():
            if e.major_minor == number:
                uses.append(("mounted at", e))
            elif e.fs_type == "devtmpfs" and (e.root == root or _same_node(e, rdev)):
                uses.append(("bound onto", e))
        return uses

    async def holders(self, device: str) -> list[str]:
        """Where `device` is in use: filesystem mounts of it, bind mounts of its device node,
        and kernel holders (device-mapper, md). Empty when nothing holds it."""

        def scan() -> list[str]:
            found = [f"{how} {e.mount_point}" for how, e in self._uses(device)]
            try:
                rdev = os.stat(device).st_rdev
            except FileNotFoundError:
                return found
            holders = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders")
            if holders.is_dir():
                found += [f"held by {h.name}" for h in holders.iterdir()]
            return found

        return await self._thread(scan)

    async def mount_points(self, device: str) -> list[str]:
        """Where `device` is mounted (its filesystem) or bound (its device node)."""
        return await self._thread(lambda: [e.mount_point for _, e in self._uses(device)])

    async def probe(self, device: str) -> tuple[str, str] | None:
        """What blkid finds on the device, low-level probe (no cache): ("TYPE", value) for a
        filesystem, ("PTTYPE", value) for a partition table, None for a blank device."""
        code, out = await self.runner.run(
            "blkid", "-p", "-o", "export", device, ok=(0, 2)
        )  # 2: nothing found
        if code == 2:
            return None
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        for key in ("TYPE", "PTTYPE"):
            if key in values:
                return key, values[key]
        return "UNKNOWN", ",".join(sorted(values))

    async def usage(self, path: str) -> Usage:
        st = await self._thread(os.statvfs, path)
        return Usage(
            total_bytes=st.f_blocks * st.f_frsize,
            available_bytes=st.f_bavail * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            total_inodes=st.f_files,
            free_inodes=st.f_ffree,
            used_inodes=st.f_files - st.f_ffree,
        )

    async def device_size(self, device: str) -> int:
        _, out = await self.runner.run("blockdev", "--getsize64", device)
        return int(out.strip())

    # -- changing state ------------------------------------------------------------------

    async def mkfs(self, device: str, fs_type: str) -> None:
        if fs_type == "ext4":
            # No -F: mke2fs then refuses a device that holds something after all.
            await self.runner.run("mkfs.ext4", "-q", "-m", "0", device)
        elif fs_type == "xfs":
            await self.runner.run("mkfs.xfs", "-q", device)
        else:
            raise ValueError(f"cannot make a {fs_type} filesystem")
        log.info("made a %s filesystem on %s", fs_type, device)

    async def mount(self, device: str, target: str, fs_type: str, options: Sequence[str]) -> None:
        opts = list(options)
        if fs_type == "xfs" and "nouuid" not in opts:
            # Clones and snapshots of one volume share the filesystem's UUID.
            opts.append("nouuid")
        argv = ["mount", "-t", fs_type]
        if opts:
            argv += ["-o", ",".join(opts)]
        await self.runner.run(*argv, device, target)

    async def bind(self, source: str, target: str, readonly: bool, flags: Sequence[str]) -> None:
        await self.runner.run("mount", "--bind", source, target)
        extra = [f for f in flags if f not in ("bind", "rw", "ro", "defaults")]
        if readonly or extra:
            # A bind mount takes ro and most flags only on a remount of the bind itself.
            opts = ["remount", "bind", "ro" if readonly else "rw", *extra]
            try:
                await self.runner.run("mount", "-o", ",".join(opts), target)
            except CommandError:
                await self.runner.run("umount", target)
                raise

    async def umount(self, target: str) -> None:
        await self.runner.run("umount", target)

    async def grow(self, device: str, mount_point: str, fs_type: str) -> None:
        """Grow a mounted filesystem to its device's size (both grow online)."""
        if fs_type == "ext4":
            await self.runner.run("resize2fs", device)
        elif fs_type == "xfs":
            await self.runner.run("xfs_growfs", mount_point)
        else:
            raise ValueError(f"cannot grow a {fs_type} filesystem")

    # -- files ---------------------------------------------------------------------------

    async def make_dir(self, path: str) -> None:
        await self._thread(lambda: os.makedirs(path, mode=0o750, exist_ok=True))

    async def make_file(self, path: str) -> None:
        """An empty regular file to bind a block device onto (the CO expects us to make it)."""

        def touch() -> None:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o640)
            os.close(fd)

        await self._thread(touch)

    async def remove(self, path: str) -> None:
        """Remove the (unmounted) target of a publish: an empty directory or a file."""

        def rm() -> None:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return
            if stat.S_ISDIR(mode):
                os.rmdir(path)
            else:
                os.unlink(path)

        await self._thread(rm)

    async def exists(self, path: str) -> bool:
        return await self._thread(os.path.lexists, path)
