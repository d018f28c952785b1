"""Crash test: SIGKILL the storage node under a write load, restart it, check flushed data.

Owns: the promise behind NBD_CMD_FLUSH and FUA. Twenty times, a libnbd client
(tests/clients/durability_load.py under Debian's python3) writes self-describing blocks with
several requests in flight and a FLUSH every few writes; at a random moment the storage node
and any process it started are killed with SIGKILL; it is restarted on the same data dir and
port, and every write covered by a completed flush (or a completed FUA write) must read back
exactly, in this generation and all earlier ones. Blocks written but not covered must read as
zeros or as exactly what was written. The random seed is printed; set NBD_DURABILITY_SEED to
replay a run. On our storage node it runs against command-line exports and against a volume
reached through its attachment (the product path: credential, Stats and QoS layers in the
way; the node restarts from its data dir and serves the same attachment again).
NBD_CLIENT_TESTS_SERVER=qemu-nbd runs the same test against qemu-nbd.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.clients.targets import (
    DEBIAN_PYTHON,
    ExportSpec,
    NbdTarget,
    access_kinds,
    debian_python_env,
    describe,
    run,
    server_kind,
    start_target,
)
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

LOAD_SCRIPT = Path(__file__).parent / "clients" / "durability_load.py"
ROUNDS = 20
BLOCK = 4096
BLOCKS_PER_ROUND = 4096  # 16 MiB region per generation: never rewritten, so "covered" is exact
EXPORT = ExportSpec("crash", ROUNDS * BLOCKS_PER_ROUND * BLOCK)
# When to kill, drawn per round: once the log shows this many more blocks durable, plus a jitter
# in seconds. Counting progress rather than seconds keeps every kill inside the load (and the
# region) whatever the server's speed.
KILL_AFTER_COVERED = (0, 2500)
KILL_JITTER = (0.0, 0.05)


def descendants(pid: int) -> list[int]:
    """Every live process below pid (workers the storage node may have started)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def crash(target: NbdTarget) -> None:
    """SIGKILL the server processes (and what they started), by pid, and wait until gone."""
    for handle in target.servers():
        pids = [handle.proc.pid, *descendants(handle.proc.pid)]
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        handle.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.01)


def alive(pid: int) -> bool:
    """Still running: neither gone nor a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def load(uri: str, log: Path, generation: int) -> Iterator[subprocess.Popen[str]]:
    first = generation * BLOCKS_PER_ROUND
    argv = [DEBIAN_PYTHON, str(LOAD_SCRIPT), "write", uri, str(log)]
    argv += ["--generation", str(generation), "--first-block", str(first)]
    argv += ["--blocks", str(BLOCKS_PER_ROUND)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=debian_python_env()
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def covered_in_log(log: Path) -> int:
    """Blocks the load generator has logged as durable so far (complete lines only)."""
    lines = log.read_text().split("\n")[:-1]
    return sum(len(json.loads(line)["blocks"]) for line in lines)


def wait_covered(log: Path, target: int, writer: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while covered_in_log(log) < target and writer.poll() is None:
        assert time.monotonic() < deadline, f"load made no progress to {target} durable blocks"
        time.sleep(0.005)


def wait_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("access", access_kinds())
def test_flushed_writes_survive_sigkill(tmp_path: Path, access: str) -> None:
    seed = int(os.environ.get("NBD_DURABILITY_SEED", random.randrange(1 << 32)))
    print(f"NBD_DURABILITY_SEED={seed}")
    rng = random.Random(seed)
    kind = server_kind()
    port = free_port()
    workdir = tmp_path / "server"
    log = tmp_path / "durable.jsonl"
    log.touch()

    def start() -> NbdTarget:
        # Same workdir and port each time: the image left by the killed server is served again.
        return start_target(kind, workdir, [EXPORT], port=port, access=access)

    target = start()
    totals = {"covered": 0, "flushes": 0, "rounds_killed_mid_load": 0}
    try:
        for gen in range(ROUNDS):
            kill_at = covered_in_log(log) + rng.randint(*KILL_AFTER_COVERED)
            jitter = rng.uniform(*KILL_JITTER)
            when = f"killed at {kill_at} durable blocks + {jitter:.3f}s"
            with load(target.uri(EXPORT.name), log, gen) as writer:
                assert wait_line(writer, 30) == "connected", writer.communicate(timeout=10)
                wait_covered(log, kill_at, writer, timeout=30)
                time.sleep(jitter)
                mid_load = writer.poll() is None
                crash(target)
                out, err = writer.communicate(timeout=30)
            assert writer.returncode == 0, f"load generator failed:\n{out}\n{err}"
            summary = json.loads(out.strip().splitlines()[-1])
            totals["flushes"] += summary["flushes"]
            totals["rounds_killed_mid_load"] += mid_load

            target = start()
            first = gen * BLOCKS_PER_ROUND
            maybe = f"{gen}:{first}:{summary['next_block'] - first}"
            verify = [DEBIAN_PYTHON, str(LOAD_SCRIPT), "verify", target.uri(EXPORT.name), str(log)]
            p = run([*verify, "--maybe", maybe], env=debian_python_env(), check=False, timeout=60)
            where = f"round {gen} (seed {seed}, {when}, load {summary})"
            assert p.returncode == 0, f"{where}:\n{describe(p)}"
            checked = json.loads(p.stdout.strip().splitlines()[-1])
            totals["covered"] = checked["covered"]
            print(f"round {gen}: {when}, load {summary}, verify {checked}")
    finally:
        target.stop()
        print(target.logs()[-8000:])
    print(f"totals: {totals}")
    # The test proved something only if flushes completed and some kills hit a running load.
    assert totals["covered"] > 0 and totals["flushes"] > 0
    assert totals["rounds_killed_mid_load"] >= ROUNDS // 2, totals


@pytest.mark.parametrize("access", access_kinds())
def test_checker_notices_a_lost_write(tmp_path: Path, access: str) -> None:
    """Negative control: a block the log calls durable but the server lacks fails the check."""
    target = start_target(server_kind(), tmp_path / "server", [EXPORT], access=access)
    try:
        log = tmp_path / "durable.jsonl"
        log.write_text(json.dumps({"gen": 0, "blocks": [5]}) + "\n")
        verify = [DEBIAN_PYTHON, str(LOAD_SCRIPT), "verify", target.uri(EXPORT.name), str(log)]
        p = run(verify, env=debian_python_env(), check=False)
    finally:
        target.stop()
    assert p.returncode == 1, describe(p)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["bad"] == 1
    assert result["first_bad"][0]["block"] == 5
    assert result["first_bad"][0]["found"]["zero"] is True
