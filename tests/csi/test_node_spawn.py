"""How the node plugin starts its children (mkfs, mount, umount...): never through fork().

Owns the regression tests of issue 12's crashed children: under uvloop (the plugin's loop) an
asyncio subprocess is started with fork(), which runs every at-fork handler of the process,
gRPC's among them; with other threads inside gRPC those handlers crashed the child with SIGSEGV.
`csi.mounts.Runner` spawns with posix_spawn, which runs none, and the entry point turns gRPC's
fork support off before gRPC is imported. Each check runs in a fresh interpreter, so the
at-fork handlers and environment it sets up do not leak into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.support.servers import REPO

_COUNT_FORKS = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import uvloop
    from csi.mounts import Runner

    forks = []
    os.register_at_fork(before=lambda: forks.append(1))

    async def main():
        runner = Runner()
        outputs = [
            (await runner.run("sh", "-c", f"echo out {i}; echo err {i} >&2"))[1]
            for i in range(20)
        ]
        code, _ = await runner.run("sh", "-c", "kill -SEGV $$", ok=(-11,))
        runner.close()
        by_runner = len(forks)
        # The control: uvloop's own subprocesses do fork (so the counter can see one).
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        return {"by_runner": by_runner, "by_uvloop": len(forks) - by_runner,
                "outputs": outputs, "segv": code}

    print(json.dumps(uvloop.run(main())))
    """
)


def _python(script: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), **env),
        check=True,
    )
    return result.stdout


def test_children_are_spawned_without_fork_handlers() -> None:
    found = json.loads(_python(_COUNT_FORKS))
    assert found["by_uvloop"] == 1, found  # the counter works
    assert found["by_runner"] == 0, found
    assert found["outputs"] == [f"out {i}\nerr {i}\n" for i in range(20)]
    assert found["segv"] == -11  # a child killed by a signal reports it as before


def test_entry_point_turns_grpc_fork_support_off_before_grpc_loads() -> None:
    script = textwrap.dedent(
        """
        import sys
        import csi.__main__ as entry
        assert "grpc" not in sys.modules
        entry.disable_grpc_fork_handlers()
        from grpc._cython import cygrpc
        print(cygrpc._GRPC_ENABLE_FORK_SUPPORT)
        """
    )
    # Even when the environment asks for it (a value inherited from the pod spec).
    assert _python(script, GRPC_ENABLE_FORK_SUPPORT="true").strip() == "False"


def test_command_not_found_is_a_clear_error() -> None:
    script = textwrap.dedent(
        """
        import asyncio
        from csi.mounts import CommandError, Runner
        async def main():
            try:
                await Runner().run("no-such-tool-here", "x")
            except CommandError as exc:
                print(exc.code, exc)
        asyncio.run(main())
        """
    )
    out = _python(script)
    assert out.startswith("127 no-such-tool-here x exited 127: no-such-tool-here: command not")
