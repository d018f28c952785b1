"""The handshake state machine, byte for byte against shared/reference/nbd-protocol.md."""

from __future__ import annotations

import struct

import pytest

from storage_node.backend.file import FileBackend
from storage_node.exports import Export, ExportRegistry
from storage_node.files import create_sparse
from storage_node.nbd.handshake import Handshake, HandshakeError, Phase

from .wire import go_data, meta_data, option, parse_replies

ERR = 1 << 31
ACK, SERVER, INFO, META = 1, 2, 3, 4
UNSUP, POLICY, INVALID, UNKNOWN, SHUTDOWN = ERR + 1, ERR + 2, ERR + 3, ERR + 6, ERR + 7
GO_FLAGS_RW = 0b1101_0110_1101  # HAS_FLAGS FLUSH FUA TRIM WZ MULTI_CONN CACHE FAST_ZERO
SIZE = 1 << 20


@pytest.fixture
def registry(tmp_path):
    reg = ExportRegistry()
    for name, desc in (("disk", "the disk"), ("other", "")):
        path = tmp_path / f"{name}.img"
        create_sparse(path, SIZE)
        reg.add(Export(name, FileBackend(str(path)), desc))
    path = tmp_path / "secret.img"
    create_sparse(path, SIZE)
    reg.add(
        Export(
            "secret", FileBackend(str(path)), allowed_peers=frozenset({"127.0.0.9"}), listed=False
        )
    )
    return reg


def start(registry, peer="127.0.0.1", client_flags=3, shutting_down=False):
    hs = Handshake(registry, peer, shutting_down=lambda: shutting_down)
    greeting = hs.greeting()
    assert greeting == struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3)
    assert hs.receive(struct.pack(">I", client_flags)) == b""
    assert hs.phase is Phase.OPTIONS
    return hs


def test_unknown_client_flag_drops_the_connection(registry):
    hs = Handshake(registry, "127.0.0.1")
    hs.greeting()
    with pytest.raises(HandshakeError, match="unknown flags"):
        hs.receive(struct.pack(">I", 4))


def test_bad_option_magic_drops_the_connection(registry):
    hs = start(registry)
    with pytest.raises(HandshakeError, match="magic"):
        hs.receive(b"X" * 16)


def test_oversized_option_drops_the_connection_before_buffering_it(registry):
    hs = start(registry)
    with pytest.raises(HandshakeError, match="limit"):
        hs.receive(struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30))


def test_export_name_enters_transmission_with_zeroes_unless_no_zeroes(registry):
    for flags, tail in ((1, bytes(124)), (3, b"")):
        hs = start(registry, client_flags=flags)
        out = hs.receive(option(1, b"disk") + b"trailing")
        assert out == struct.pack(">QH", SIZE, GO_FLAGS_RW) + tail
        assert hs.phase is Phase.TRANSMISSION
        assert hs.leftover == b"trailing"
        assert hs.result is not None and hs.result.export.name == "disk"


def test_export_name_unknown_is_a_hard_disconnect(registry):
    hs = start(registry)
    with pytest.raises(HandshakeError, match="nope"):
        hs.receive(option(1, b"nope"))


GO, INFO_OPT = 7, 6


@pytest.mark.parametrize(
    ("name", "infos", "expect"),
    [
        pytest.param(
            "disk",
            (),
            [
                (INFO, b"\0\0" + struct.pack(">QH", SIZE, GO_FLAGS_RW)),
                (INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20)),
                (ACK, b""),
            ],
            id="go-plain",
        ),
        pytest.param(
            "disk",
            (1, 2),
            [
                (INFO, b"\0\0" + struct.pack(">QH", SIZE, GO_FLAGS_RW)),
                (INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20)),
                (INFO, b"\0\1disk"),
                (INFO, b"\0\2the disk"),
                (ACK, b""),
            ],
            id="go-name-description",
        ),
        pytest.param(
            "nope", (), [(UNKNOWN, b"no export named 'nope' for 127.0.0.1")], id="go-unknown"
        ),
        pytest.param(
            "secret",
            (),
            [(UNKNOWN, b"no export named 'secret' for 127.0.0.1")],
            id="go-other-address-looks-unknown",
        ),
    ],
)
def test_go(registry, name, infos, expect):
    hs = start(registry)
    replies = parse_replies(hs.receive(option(GO, go_data(name, *infos))))
    assert [(rep, data) for _, rep, data in replies] == expect
    assert all(opt == GO for opt, _, _ in replies)
    assert hs.phase is (Phase.TRANSMISSION if expect[-1][0] == ACK else Phase.OPTIONS)


def test_info_does_not_end_the_handshake_then_go_does(registry):
    hs = start(registry)
    info = parse_replies(hs.receive(option(INFO_OPT, go_data("disk"))))
    assert info[-1][1] == ACK and hs.phase is Phase.OPTIONS
    go = parse_replies(hs.receive(option(GO, go_data("disk"))))
    assert [r[1:] for r in go] == [r[1:] for r in info]
    assert hs.phase is Phase.TRANSMISSION


def test_export_allowed_for_its_address(registry):
    hs = start(registry, peer="127.0.0.9")
    assert parse_replies(hs.receive(option(GO, go_data("secret"))))[-1][1] == ACK


@pytest.mark.parametrize(
    ("opt", "data", "rep", "message"),
    [
        pytest.param(GO, b"\0\0\0\x09disk", INVALID, b"name runs past", id="go-name-overrun"),
        pytest.param(GO, go_data("disk") + b"x", INVALID, b"trailing", id="go-trailing"),
        pytest.param(GO, b"\0\0\0\4disk\0\2\0\1", INVALID, b"past the end", id="go-short-infos"),
        pytest.param(GO, b"\0\0\0\2\xff\xfe\0\0", INVALID, b"UTF-8", id="go-bad-utf8"),
        pytest.param(3, b"x", INVALID, b"takes no data", id="list-with-data"),
        pytest.param(8, b"x", INVALID, b"takes no data", id="structured-with-data"),
        pytest.param(
            10,
            meta_data("disk", "base:allocation"),
            INVALID,
            b"STRUCTURED_REPLY",
            id="set-meta-before-structured",
        ),
        pytest.param(5, b"", UNSUP, b"not supported", id="starttls"),
        pytest.param(11, b"", UNSUP, b"not supported", id="extended-headers"),
        pytest.param(0x12345, b"abc", UNSUP, b"not supported", id="unknown-option"),
    ],
)
def test_option_errors_keep_the_session(registry, opt, data, rep, message):
    hs = start(registry)
    [(got_opt, got_rep, got_msg)] = parse_replies(hs.receive(option(opt, data)))
    assert (got_opt, got_rep) == (opt, rep)
    assert message in got_msg
    assert hs.phase is Phase.OPTIONS
    # the session goes on: a GO still works
    assert parse_replies(hs.receive(option(GO, go_data("disk"))))[-1][1] == ACK


def test_list_shows_listed_exports_with_descriptions(registry):
    hs = start(registry)
    replies = parse_replies(hs.receive(option(3)))
    assert replies == [
        (3, SERVER, b"\0\0\0\4diskthe disk"),
        (3, SERVER, b"\0\0\0\5other"),
        (3, ACK, b""),
    ]


def test_abort_is_acknowledged_and_closes(registry):
    hs = start(registry)
    assert parse_replies(hs.receive(option(2, b"ignored"))) == [(2, ACK, b"")]
    assert hs.phase is Phase.CLOSED
    with pytest.raises(HandshakeError):
        hs.receive(option(3))


@pytest.mark.parametrize(
    ("opt", "queries", "expect"),
    [
        pytest.param(9, (), [(META, b"\0\0\0\0base:allocation")], id="list-all"),
        pytest.param(9, ("base:",), [(META, b"\0\0\0\0base:allocation")], id="list-wildcard"),
        pytest.param(9, ("qemu:dirty-bitmap:x",), [], id="list-unknown-namespace"),
        pytest.param(10, ("base:allocation",), [(META, b"\0\0\0\1base:allocation")], id="set"),
        pytest.param(10, ("base:",), [], id="set-wildcard-selects-nothing"),
        pytest.param(10, ("base:nothing", "x-foo:bar"), [], id="set-unknown"),
    ],
)
def test_meta_contexts(registry, opt, queries, expect):
    hs = start(registry)
    assert parse_replies(hs.receive(option(8))) == [(8, ACK, b"")]
    replies = parse_replies(hs.receive(option(opt, meta_data("disk", *queries))))
    assert [(rep, data) for _, rep, data in replies] == [*expect, (ACK, b"")]


def test_meta_context_counts_only_for_the_export_chosen(registry):
    for chosen, contexts in (("disk", {1: "base:allocation"}), ("other", {})):
        hs = start(registry)
        hs.receive(option(8))
        hs.receive(option(10, meta_data("disk", "base:allocation")))
        hs.receive(option(GO, go_data(chosen)))
        assert hs.result is not None
        assert hs.result.structured_replies
        assert hs.result.meta_contexts == contexts


def test_query_without_namespace_is_invalid(registry):
    hs = start(registry)
    hs.receive(option(8))
    [(_, rep, _)] = parse_replies(hs.receive(option(9, meta_data("disk", "nonamespace"))))
    assert rep == INVALID


def test_shutting_down_refuses_options_but_acks_abort(registry):
    hs = start(registry, shutting_down=True)
    [(_, rep, _)] = parse_replies(hs.receive(option(GO, go_data("disk"))))
    assert rep == SHUTDOWN
    assert parse_replies(hs.receive(option(2))) == [(2, ACK, b"")]


def test_too_many_options_drop_the_connection(registry):
    hs = start(registry)
    with pytest.raises(HandshakeError, match="more than"):
        hs.receive(option(8) * 2000)


def test_one_byte_at_a_time_equals_all_at_once(registry):
    stream = (
        struct.pack(">I", 1)
        + option(3)
        + option(8)
        + option(10, meta_data("disk", "base:allocation"))
        + option(GO, go_data("disk", 1, 2, 3))
        + b"\x25\x60\x95\x13"
    )
    whole = Handshake(registry, "127.0.0.1")
    whole.greeting()
    expected = whole.receive(stream)
    split = Handshake(registry, "127.0.0.1")
    split.greeting()
    got = b"".join(split.receive(bytes([b])) for b in stream[:-4])
    assert got == expected
    assert split.phase is whole.phase is Phase.TRANSMISSION
    assert whole.leftover == b"\x25\x60\x95\x13"
    assert split.leftover == b""
