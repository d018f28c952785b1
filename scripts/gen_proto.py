"""Regenerate (or check) the Python code compiled from the .proto files under proto/.

Owns the mapping from proto sources to checked-in generated code. Every
``proto/<pkg>/<name>.proto`` produces ``<pkg>/<name>_pb2.py``, ``<name>_pb2.pyi`` and
``<name>_pb2_grpc.py`` at the repository root, so the protoc import paths resolve as Python
packages (``proto/csi/v1/csi.proto`` -> ``from csi.v1 import csi_pb2``). Each directory that
receives generated modules also gets a generated one-line ``__init__.py``; the parent packages
(``csi/``, ``storage_node/``) are hand-written and never touched here.

The compiler is grpcio-tools' bundled protoc, run as
``protoc -Iproto -I<grpc_tools well-known protos> --python_out --pyi_out --grpc_python_out``.
Its output is deterministic for a given grpcio-tools version; pyproject.toml pins that version,
because the generated files embed it.

Usage (from anywhere):
    python scripts/gen_proto.py            # regenerate in place, remove stale generated files
    python scripts/gen_proto.py --check    # exit 1 and list files that differ from a fresh run
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import importlib.resources
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
GENERATED_INIT = '"""Generated code, never edit by hand; regenerate with scripts/gen_proto.py."""\n'


class GenerationError(RuntimeError):
    """protoc failed; the message carries its stderr."""


@dataclass(frozen=True)
class Difference:
    """One generated file whose checked-in state does not match a fresh generation."""

    path: str  # relative to the repository root, with forward slashes
    problem: str  # "differs", "missing" or "stale"

    def __str__(self) -> str:
        return f"{self.problem}: {self.path}"


def find_protos(repo_root: Path = REPO_ROOT) -> list[Path]:
    """Every .proto under proto/, relative to proto/, in a stable order."""
    proto_root = repo_root / PROTO_DIR
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def well_known_include_dir() -> Path:
    """grpc_tools' bundled google/protobuf/*.proto (descriptor, timestamp, wrappers, ...)."""
    return Path(str(importlib.resources.files("grpc_tools") / "_proto"))


def run_protoc(
    proto_root: Path, protos: list[Path], out_dir: Path, extra_args: tuple[str, ...] = ()
) -> None:
    """Compile ``protos`` (relative to ``proto_root``) into ``out_dir``.

    By default protoc emits Python modules, type stubs and gRPC modules; ``extra_args``, when
    given, replace those output options (the tests pass ``--descriptor_set_out=...``). Runs
    protoc in a child process so a failure cannot take the caller down.
    """
    if not protos:
        raise GenerationError(f"no .proto files under {proto_root}")
    args = extra_args or (
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    )
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known_include_dir()}",
        *args,
        # Paths relative to the -I root: they become the file names recorded in the
        # descriptors and the "source:" headers, so nothing machine-specific leaks in.
        *(p.as_posix() for p in protos),
    ]
    result = subprocess.run(
        command, cwd=proto_root, capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise GenerationError(f"protoc failed ({result.returncode}):\n{result.stderr.strip()}")


def generated_paths(protos: list[Path]) -> list[str]:
    """Repository-relative paths of every file a generation writes for ``protos``."""
    paths: set[str] = set()
    for proto in protos:
        package = proto.parent.as_posix()
        paths.update(f"{package}/{proto.stem}{suffix}" for suffix in GENERATED_SUFFIXES)
        paths.add(f"{package}/__init__.py")
    return sorted(paths)


def generate(out_dir: Path, repo_root: Path = REPO_ROOT) -> list[str]:
    """Generate all code for repo_root's protos into ``out_dir``; return the relative paths."""
    protos = find_protos(repo_root)
    loose = [p.as_posix() for p in protos if p.parent == Path(".")]
    if loose:
        raise GenerationError(f"protos must sit in a package directory under proto/: {loose}")
    run_protoc(repo_root / PROTO_DIR, protos, out_dir)
    for package in {proto.parent for proto in protos}:
        (out_dir / package / "__init__.py").write_text(GENERATED_INIT, encoding="utf-8")
    paths = generated_paths(protos)
    produced = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    if produced != paths:
        raise GenerationError(f"protoc produced {produced}, expected {paths}")
    return paths


def _looks_generated(path: Path) -> bool:
    if path.name == "__init__.py":
        return path.read_text(encoding="utf-8") == GENERATED_INIT
    return path.name.endswith(GENERATED_SUFFIXES)


def stale_paths(expected: list[str], repo_root: Path = REPO_ROOT) -> list[str]:
    """Generated-looking files in the mirrored top-level packages that no proto produces.

    Only the top-level directories that protos mirror into (``csi/``, ``storage_node/``) are
    searched, so nothing outside the generated code's reach is ever reported or deleted.
    """
    tops = {path.split("/", 1)[0] for path in expected}
    found: list[str] = []
    for top in sorted(tops):
        for path in (repo_root / top).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            rel = path.relative_to(repo_root).as_posix()
            if rel not in expected and _looks_generated(path):
                found.append(rel)
    return sorted(found)


def check(repo_root: Path = REPO_ROOT) -> list[Difference]:
    """Compare the checked-in generated code with a fresh generation; [] means up to date."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        fresh = Path(tmp)
        paths = generate(fresh, repo_root)
        differences: list[Difference] = []
        for rel in paths:
            checked_in = repo_root / rel
            if not checked_in.is_file():
                differences.append(Difference(rel, "missing"))
            elif not filecmp.cmp(fresh / rel, checked_in, shallow=False):
                differences.append(Difference(rel, "differs"))
    differences.extend(Difference(rel, "stale") for rel in stale_paths(paths, repo_root))
    return differences


def write(repo_root: Path = REPO_ROOT) -> list[Difference]:
    """Bring the checked-in generated code up to date; return what was changed."""
    with tempfile.TemporaryDirectory(prefix="gen_proto_") as tmp:
        fresh = Path(tmp)
        paths = generate(fresh, repo_root)
        changed: list[Difference] = []
        for rel in paths:
            target = repo_root / rel
            new = (fresh / rel).read_bytes()
            if target.is_file() and target.read_bytes() == new:
                continue  # leave untouched files alone, mtimes included
            changed.append(Difference(rel, "differs" if target.exists() else "missing"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(new)
    for rel in stale_paths(paths, repo_root):
        (repo_root / rel).unlink()
        changed.append(Difference(rel, "stale"))
    return changed


def pinned_grpcio_tools(repo_root: Path = REPO_ROOT) -> str | None:
    """The grpcio-tools version pyproject.toml pins for the test extra, if any."""
    pyproject = repo_root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    for extra in data.get("project", {}).get("optional-dependencies", {}).values():
        for requirement in extra:
            name, sep, version = requirement.replace(" ", "").partition("==")
            if sep and name.lower() == "grpcio-tools":
                return str(version)
    return None


def version_note(repo_root: Path = REPO_ROOT) -> str | None:
    """Explain a likely cause of differences: grpcio-tools other than the pinned one."""
    installed = importlib.metadata.version("grpcio-tools")
    pinned = pinned_grpcio_tools(repo_root)
    if pinned is None or pinned == installed:
        return None
    return (
        f"note: grpcio-tools {installed} is installed but pyproject.toml pins {pinned}; "
        "the generated files embed that version"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and fail if checked-in files differ",
    )
    args = parser.parse_args(argv)
    note = version_note()
    try:
        if args.check:
            differences = check()
            for difference in differences:
                print(difference)
            if differences:
                print("generated code is out of date; run: python scripts/gen_proto.py")
                if note:
                    print(note)
                return 1
            return 0
        if note:
            print(note, file=sys.stderr)
        for change in write():
            print(f"fixed {change}")
        return 0
    except GenerationError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
