"""Generated protobuf code: reproducible from proto/, and wire-identical to the CSI v1.12 spec.

(a) scripts/gen_proto.py regenerates exactly the checked-in csi/v1/ files, and its --check mode
    reports edited, missing and stale generated files (exercised on a scratch copy of the repo).
(b) Our proto/csi/v1/csi.proto, compiled, and the descriptor embedded in the checked-in
    csi_pb2.py both equal the spec's csi.proto compiled by the same protoc: message by message,
    field by field (name, number, label, type, type name, oneof, options), every enum value,
    every service method (request/response types, streaming, options), every extension, and
    finally the whole FileDescriptorProto. Comments and source info are not part of the
    comparison; json_name is dropped too (derived from the field name; the Python generator
    strips it).

The spec proto is the upstream file vendored in tests/reference/csi-spec-v1.12.0/ (with its
license and the tag it came from): the tests need nothing outside the repository, and a
missing file is a failure, never a skip.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, text_format

from csi.v1 import csi_pb2, csi_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = REPO_ROOT / "tests" / "reference" / "csi-spec-v1.12.0"
REFERENCE_PROTO = REFERENCE_DIR / "csi.proto"
OUR_PROTO = Path("csi/v1/csi.proto")  # relative to proto/


def _load_gen_proto() -> ModuleType:
    """scripts/ is not a package: load scripts/gen_proto.py by path."""
    name = "gen_proto"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen_proto = _load_gen_proto()


# ---------------------------------------------------------------------------------------------
# (a) the checked-in code is what the script generates
# ---------------------------------------------------------------------------------------------


def test_checked_in_code_matches_fresh_generation() -> None:
    differences = gen_proto.check()
    hint = gen_proto.version_note() or ""
    assert [str(d) for d in differences] == [], f"run: python scripts/gen_proto.py\n{hint}"


def test_generated_modules_import_by_absolute_package_path() -> None:
    # The grpc module must reach its messages as csi.v1.csi_pb2, not as a top-level csi_pb2.
    assert csi_pb2_grpc.csi_dot_v1_dot_csi__pb2 is csi_pb2
    assert csi_pb2.DESCRIPTOR.name == OUR_PROTO.as_posix()
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"


SECOND_PROTO = """syntax = "proto3";
package storage_node.v1;
import "google/protobuf/timestamp.proto";
message Ping { google.protobuf.Timestamp at = 1; }
service Management { rpc Echo(Ping) returns (Ping) {} }
"""


@pytest.fixture
def scratch_repo(tmp_path: Path) -> Path:
    """A copy of proto/ and the generated code, plus a second proto in another package."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "proto", root / "proto")
    (root / "proto/storage_node/v1").mkdir(parents=True, exist_ok=True)
    (root / "proto/storage_node/v1/management.proto").write_text(SECOND_PROTO)
    assert gen_proto.write(root)  # first run creates everything
    return root


def _edit(root: Path) -> None:
    path = root / "csi/v1/csi_pb2.py"
    path.write_text(path.read_text() + "# hand edit\n")


def _delete(root: Path) -> None:
    (root / "storage_node/v1/management_pb2_grpc.py").unlink()


def _orphan(root: Path) -> None:
    (root / "csi/v2").mkdir()
    (root / "csi/v2/old_pb2.py").write_text("# left over from a removed proto\n")


def _orphan_package(root: Path) -> None:
    (root / "storage_node/v0").mkdir()
    (root / "storage_node/v0/__init__.py").write_text(gen_proto.GENERATED_INIT)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(lambda root: None, [], id="untouched"),
        pytest.param(_edit, ["differs: csi/v1/csi_pb2.py"], id="hand-edited"),
        pytest.param(_delete, ["missing: storage_node/v1/management_pb2_grpc.py"], id="deleted"),
        pytest.param(_orphan, ["stale: csi/v2/old_pb2.py"], id="stale-module"),
        pytest.param(_orphan_package, ["stale: storage_node/v0/__init__.py"], id="stale-init"),
    ],
)
def test_check_reports_then_write_repairs(
    scratch_repo: Path, mutate: Any, expected: list[str]
) -> None:
    mutate(scratch_repo)
    assert [str(d) for d in gen_proto.check(scratch_repo)] == expected
    assert [str(d) for d in gen_proto.write(scratch_repo)] == expected
    assert gen_proto.check(scratch_repo) == []


def test_every_proto_gets_its_mirrored_package(scratch_repo: Path) -> None:
    files = sorted(
        p.relative_to(scratch_repo).as_posix()
        for p in scratch_repo.rglob("*")
        if p.is_file() and "proto" not in p.relative_to(scratch_repo).parts[:1]
    )
    assert files == [
        "csi/v1/__init__.py",
        "csi/v1/csi_pb2.py",
        "csi/v1/csi_pb2.pyi",
        "csi/v1/csi_pb2_grpc.py",
        "storage_node/v1/__init__.py",
        "storage_node/v1/management_pb2.py",
        "storage_node/v1/management_pb2.pyi",
        "storage_node/v1/management_pb2_grpc.py",
        "storage_node/v1/storage_node_pb2.py",
        "storage_node/v1/storage_node_pb2.pyi",
        "storage_node/v1/storage_node_pb2_grpc.py",
    ]
    grpc_module = (scratch_repo / "storage_node/v1/management_pb2_grpc.py").read_text()
    assert "from storage_node.v1 import management_pb2 " in grpc_module


def test_check_leaves_hand_written_files_alone(scratch_repo: Path) -> None:
    # A parent package's own __init__.py and other modules are never stale, whatever their name.
    (scratch_repo / "csi/__init__.py").write_text('"""Hand-written."""\n')
    (scratch_repo / "csi/helpers.py").write_text("X = 1\n")
    assert gen_proto.check(scratch_repo) == []
    assert gen_proto.write(scratch_repo) == []
    assert (scratch_repo / "csi/helpers.py").is_file()


# ---------------------------------------------------------------------------------------------
# (b) wire compatibility with the spec
# ---------------------------------------------------------------------------------------------


def test_reference_is_vendored_with_its_license_and_tag() -> None:
    # The spec file, its Apache-2.0 license and a note naming the upstream tag travel together.
    assert REFERENCE_PROTO.read_text().startswith("// Code generated by make; DO NOT EDIT.\n")
    assert "Apache License" in (REFERENCE_DIR / "LICENSE").read_text()
    assert "tag `v1.12.0`" in (REFERENCE_DIR / "README.md").read_text()


def _compile(proto_root: Path, proto: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    gen_proto.run_protoc(proto_root, [proto], out.parent, (f"--descriptor_set_out={out}",))
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert [f.name for f in files] == [proto.as_posix()]
    return normalized(files[0])


def _strip_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in [*message.field, *message.extension]:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _strip_json_names(nested)


def normalized(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The wire-relevant part of a file descriptor: no comments, no source info, no json_name."""
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    copy.ClearField("source_code_info")
    for extension in copy.extension:
        extension.ClearField("json_name")
    for message in copy.message_type:
        _strip_json_names(message)
    return copy


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The spec's proto compiled under our file name, so the two descriptors are comparable."""
    root = tmp_path_factory.mktemp("reference")
    (root / OUR_PROTO.parent).mkdir(parents=True)
    shutil.copyfile(REFERENCE_PROTO, root / OUR_PROTO)
    return _compile(root, OUR_PROTO, root / "reference.pb")


def _ours_compiled(tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    return _compile(REPO_ROOT / "proto", OUR_PROTO, tmp / "ours.pb")


def _ours_generated(tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    return normalized(
        descriptor_pb2.FileDescriptorProto.FromString(csi_pb2.DESCRIPTOR.serialized_pb)
    )


GENERATED = _ours_generated(Path())


def _options(options: Any) -> str:
    """Options as readable text; raw bytes if they hold only extensions nobody registered."""
    text = text_format.MessageToString(options, as_one_line=True)
    raw = options.SerializeToString(deterministic=True)
    return text if text or not raw else f"raw:{raw.hex()}"


def _walk(
    prefix: str, messages: Any, enums: Any
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto]]:
    for enum in enums:
        yield f"{prefix}.{enum.name}", enum
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _walk(name, message.nested_type, message.enum_type)


def messages_of(file: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    return {n: m for n, m in _walk(file.package, file.message_type, []) if hasattr(m, "field")}


def enums_of(file: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    return {
        n: e
        for n, e in _walk(file.package, file.message_type, file.enum_type)
        if hasattr(e, "value")
    }


def services_of(file: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    return {f"{file.package}.{s.name}": s for s in file.service}


def field_rows(message: descriptor_pb2.DescriptorProto) -> list[tuple[object, ...]]:
    oneofs = [o.name for o in message.oneof_decl]
    return [
        (
            f.name,
            f.number,
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            f.type_name,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            f.proto3_optional,
            _options(f.options),
        )
        for f in message.field
    ]


def message_shape(message: descriptor_pb2.DescriptorProto) -> dict[str, object]:
    return {
        "options": _options(message.options),
        "oneofs": [o.name for o in message.oneof_decl],
        "nested": [n.name for n in message.nested_type],
        "enums": [e.name for e in message.enum_type],
        "reserved": [(r.start, r.end) for r in message.reserved_range],
        "reserved_names": list(message.reserved_name),
    }


def value_rows(enum: descriptor_pb2.EnumDescriptorProto) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = [(None, None, _options(enum.options))]
    rows += [(v.name, v.number, _options(v.options)) for v in enum.value]
    return rows


def method_rows(service: descriptor_pb2.ServiceDescriptorProto) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = [(None, None, None, None, None, _options(service.options))]
    rows += [
        (
            m.name,
            m.input_type,
            m.output_type,
            m.client_streaming,
            m.server_streaming,
            _options(m.options),
        )
        for m in service.method
    ]
    return rows


def extension_rows(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[object, ...]]:
    return sorted(
        (e.extendee, e.name, e.number, descriptor_pb2.FieldDescriptorProto.Type.Name(e.type))
        for e in file.extension
    )


def file_rows(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    return {
        "name": file.name,
        "package": file.package,
        "syntax": file.syntax,
        "dependencies": list(file.dependency),
        "options": _options(file.options),
    }


# Parametrised over our checked-in descriptor; the name-set tests catch anything the spec has
# that we lack (or the reverse).


@pytest.mark.parametrize(
    "kind", [messages_of, enums_of, services_of], ids=["messages", "enums", "services"]
)
def test_same_names_as_spec(reference: Any, kind: Any) -> None:
    assert sorted(kind(GENERATED)) == sorted(kind(reference))


@pytest.mark.parametrize("name", sorted(messages_of(GENERATED)))
def test_message_matches_spec(reference: Any, name: str) -> None:
    ours, spec = messages_of(GENERATED)[name], messages_of(reference)[name]
    assert field_rows(ours) == field_rows(spec)
    assert message_shape(ours) == message_shape(spec)
    assert ours == spec


@pytest.mark.parametrize("name", sorted(enums_of(GENERATED)))
def test_enum_matches_spec(reference: Any, name: str) -> None:
    ours, spec = enums_of(GENERATED)[name], enums_of(reference)[name]
    assert value_rows(ours) == value_rows(spec)
    assert ours == spec


@pytest.mark.parametrize("name", sorted(services_of(GENERATED)))
def test_service_matches_spec(reference: Any, name: str) -> None:
    ours, spec = services_of(GENERATED)[name], services_of(reference)[name]
    assert method_rows(ours) == method_rows(spec)
    assert ours == spec


def test_extensions_and_file_options_match_spec(reference: Any) -> None:
    assert extension_rows(GENERATED) == extension_rows(reference)
    assert file_rows(GENERATED) == file_rows(reference)


@pytest.mark.parametrize(
    "load",
    [_ours_compiled, _ours_generated],
    ids=["proto/csi/v1/csi.proto", "checked-in csi_pb2.py"],
)
def test_whole_file_descriptor_equals_spec(reference: Any, load: Any, tmp_path: Path) -> None:
    # The backstop: everything above, plus order of declarations and anything not listed.
    ours = load(tmp_path)
    assert text_format.MessageToString(ours) == text_format.MessageToString(reference)
    assert ours == reference
