"""Generate the fleetpush protocol test vectors (specs/PROTOCOL.md, "Test vectors").

Run ``python specs/vectors/generate.py`` to rewrite ``frames.json``,
``invalid_frames.json`` and ``manifest.json`` next to this file. The output is
deterministic: Ed25519 keys come from fixed seeds (Ed25519 signing is itself
deterministic), timestamps are fixed, and nothing reads a clock or a random
source. tests/protocol checks that the checked-in files equal this script's
output and that the implementation agrees with every vector.

JSON cannot hold bytes: inside decoded msgpack values a byte string is written
as ``{"$bin": "<hex>"}``; fields that are always bytes end in ``_hex``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from fleetpush.protocol import auth, codec, keys, limits
from fleetpush.protocol import messages as m
from fleetpush.protocol.frames import (
    DATA_HEADER,
    HEADER,
    MAGIC,
    PROTOCOL_MAJOR,
    encode_data_frame_header,
    encode_message_frame,
)
from fleetpush.protocol.freshness import FRESHNESS_DOMAIN, Freshness, command_digest, sign_freshness
from fleetpush.protocol.manifest import DOMAIN as MANIFEST_DOMAIN
from fleetpush.protocol.manifest import FileEntry, Manifest, sign_manifest
from fleetpush.protocol.root import ROOT_DOMAIN, Role, Root, sign_root

HERE = Path(__file__).resolve().parent

#: Fixed seeds: release keys A, B, C (a 2-of-3 root), a device key.
SEEDS = {
    "release_a": bytes(range(32)),
    "release_b": bytes(range(32, 64)),
    "release_c": bytes(range(64, 96)),
    "device": bytes([0xD0]) * 32,
    # root keys of the root vectors (root.json): v1 trusts root_1, v2 rotates to root_2.
    "root_1": bytes([0x61]) * 32,
    "root_2": bytes([0x62]) * 32,
    "timestamp": bytes([0x7A]) * 32,
}
#: The keys manifest.json lists (the root keys belong to root.json).
MANIFEST_SEEDS = ("release_a", "release_b", "release_c", "device")
CREATED = 1_767_225_600  # 2026-01-01T00:00:00Z
EXPIRES = 1_798_761_600  # 2027-01-01T00:00:00Z


def to_json(value: Any) -> Any:
    """A decoded msgpack value as JSON (bytes become ``{"$bin": hex}``)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bin": bytes(value).hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """Inverse of :func:`to_json`."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def _header(
    frame_type: int, length: int, magic: bytes = MAGIC, major: int = PROTOCOL_MAJOR
) -> bytes:
    return HEADER.pack(magic, major, frame_type, length)


def _message(name: str, envelope: list[Any], note: str) -> dict[str, Any]:
    body = codec.packb(envelope)
    frame = encode_message_frame(body)
    return {
        "name": name,
        "note": note,
        "hex": frame.hex(),
        "frame_type": 1,
        "length": len(body),
        "body_hex": body.hex(),
        "message": to_json(envelope),
    }


def _data(name: str, stream: int, file: int, chunk: int, payload: bytes) -> dict[str, Any]:
    frame = encode_data_frame_header(stream, file, chunk, len(payload)) + payload
    return {
        "name": name,
        "note": "DATA body: stream u32 | file u32 | chunk u32 | raw payload",
        "hex": frame.hex(),
        "frame_type": 2,
        "length": 12 + len(payload),
        "stream": stream,
        "file": file,
        "chunk": chunk,
        "payload_hex": payload.hex(),
    }


#: The DATA_ZSTD vector's chunk and its zstd frame (level 3, content size
#: declared), fixed here rather than compressed on each run: another zstd
#: release may compress the same bytes differently, and every valid frame
#: must decode the same way.
ZSTD_PLAIN = b"fleetpush compressed chunk " * 40
ZSTD_FRAME = bytes.fromhex(
    "28b52ffd6038031d0100d8666c6565747075736820636f6d70726573736564206368756e6b2001006be0ff1c03"
)


def _data_zstd(
    name: str, stream: int, file: int, chunk: int, *, plain: bytes, payload: bytes
) -> dict[str, Any]:
    frame = encode_data_frame_header(stream, file, chunk, len(payload), compressed=True) + payload
    return {
        "name": name,
        "note": (
            "DATA_ZSTD body (§2.3.1): stream u32 | file u32 | chunk u32 | one zstd frame "
            "declaring its content size; it expands to exactly the chunk's length"
        ),
        "hex": frame.hex(),
        "frame_type": 3,
        "length": 12 + len(payload),
        "stream": stream,
        "file": file,
        "chunk": chunk,
        "payload_hex": payload.hex(),
        "decompressed_hex": plain.hex(),
        "decompressed_length": len(plain),
    }


def device_key_public() -> bytes:
    return keys.public_bytes(keys.private_key_from_seed(SEEDS["device"]))


def valid_frames() -> dict[str, Any]:
    device_pub = device_key_public()
    hello = m.Hello(
        protocol_version="1.0",
        role="device",
        peer_id="dev-0001",
        public_key=device_pub,
        app="thermo",
        version="1.2.0",
        channel="stable",
        sequence=3,
        group="lab",
        capabilities=["blake3"],
    )
    hello_result = m.HelloResult(
        protocol_version="1.0",
        server_id="releaser-1",
        cid="c-000001",
        heartbeat=15.0,
        nonce=bytes(range(0xA0, 0xC0)),
        capabilities=[],
    )
    frames = [
        _message(
            "request: hello",
            [0, 1, "hello", codec.to_wire(hello)],
            "client's first message; all Hello fields present",
        ),
        _message(
            "response: hello result",
            [1, 1, codec.to_wire(hello_result)],
            "server's answer to request id 1; heartbeat is a float64",
        ),
        _message(
            "request: ping (empty params map)",
            [0, 7, "ping", {}],
            "params of an empty method are an empty map, never nil",
        ),
        _message(
            "request: get_chunks",
            [
                0,
                9,
                "get_chunks",
                codec.to_wire(
                    m.GetChunks(app="thermo", version="1.3.0", chunks=[(0, 0), (0, 1), (1, 0)])
                ),
            ],
            "(file, chunk) pairs are 2-element arrays",
        ),
        _message(
            "response: get_chunks result",
            [1, 9, {"sent": 3}],
            "follows the last DATA frame of stream 9",
        ),
        _message(
            "error: method not found",
            [2, 4, -32601, "unknown method 'frobnicate'", None],
            "data is nil when there is nothing to add",
        ),
        _message(
            "error: with data",
            [2, 5, 5, "device dev-0001 is pending operator approval", {"device_id": "dev-0001"}],
            "PENDING (5) carries {device_id} (§5.3), as the releaser sends it",
        ),
        _message(
            "error: hello refused",
            [
                2,
                1,
                1,
                "protocol version 2.0 is not supported: this releaser speaks 1.1",
                None,
            ],
            "VERSION_MISMATCH (1) answering hello; the bye below follows it (§5.4)",
        ),
        _message(
            "notification: bye after a refused hello",
            [
                3,
                "bye",
                {
                    "code": 1010,
                    "reason": "protocol version 2.0 is not supported: this releaser speaks 1.1",
                },
            ],
            "a refused handshake is an error, then bye with the close code (§5, §6.1)",
        ),
        _message(
            "notification: update_progress",
            [
                3,
                "update_progress",
                codec.to_wire(
                    m.UpdateProgress(
                        state="downloading",
                        app="thermo",
                        version="1.3.0",
                        push_id="p-1",
                        bytes_done=4096,
                        bytes_total=9000,
                    )
                ),
            ],
            "error field is nil when there is none",
        ),
        _message(
            "notification: bye",
            [3, "bye", {"code": 1000, "reason": "done"}],
            "closes the connection; code from §9.2",
        ),
        _data(
            "data: chunk 1 of file 0 on stream 9",
            9,
            0,
            1,
            b"fleetpush chunk payload \x00\x01\x02\xff",
        ),
        _data("data: empty payload", 9, 1, 0, b""),
        _data("data: max u32 fields", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, b"x"),
        _data_zstd(
            "data_zstd: chunk 2 of file 0 on stream 9",
            9,
            0,
            2,
            plain=ZSTD_PLAIN,
            payload=ZSTD_FRAME,
        ),
    ]
    return {
        "description": (
            "Valid fleetpush frames (specs/PROTOCOL.md §2, §3). 'hex' is the whole frame; "
            "'message' is the decoded msgpack envelope with bytes as {\"$bin\": hex}. "
            "Every vector encodes canonically: encoding 'message' gives 'body_hex' exactly."
        ),
        "frames": frames,
    }


def invalid_frames() -> dict[str, Any]:
    def msg(body: bytes) -> bytes:
        return _header(1, len(body)) + body

    bomb = b"\xdc\x27\x10" * 900
    cases: list[tuple[str, bytes, bool, str]] = [
        # name, bytes, eof after them, exception class
        ("bad magic", b"XP\x01\x01\x00\x00\x00\x01\xc0", False, "FrameError"),
        ("wrong major version 2", _header(1, 1, major=2) + b"\xc0", False, "VersionMismatch"),
        ("wrong major version 0", _header(1, 1, major=0) + b"\xc0", False, "VersionMismatch"),
        ("unknown frame type 0x00", _header(0, 1) + b"\xc0", False, "FrameError"),
        # 0x03 is DATA_ZSTD since protocol 1.1 (§2.3.1): 0x04 is the first unused type.
        ("unknown frame type 0x04", _header(4, 1) + b"\xc0", False, "FrameError"),
        (
            "MESSAGE declares more than MAX_MESSAGE_BODY (header only)",
            _header(1, limits.MAX_MESSAGE_BODY + 1),
            False,
            "FrameTooLarge",
        ),
        (
            "DATA declares more than 12 + MAX_CHUNK_SIZE (header only)",
            _header(2, 12 + limits.MAX_CHUNK_SIZE + 1),
            False,
            "FrameTooLarge",
        ),
        ("MESSAGE declares 0xFFFFFFFF bytes", _header(1, 0xFFFFFFFF), False, "FrameTooLarge"),
        (
            "DATA shorter than its 12-byte sub-header",
            _header(2, 11) + bytes(11),
            False,
            "FrameError",
        ),
        (
            "DATA_ZSTD shorter than its 12-byte sub-header",
            _header(3, 11) + bytes(11),
            False,
            "FrameError",
        ),
        (
            "DATA_ZSTD declares more than 12 + MAX_CHUNK_SIZE (header only)",
            _header(3, 12 + limits.MAX_CHUNK_SIZE + 1),
            False,
            "FrameTooLarge",
        ),
        ("truncated header at EOF", b"FP\x01\x01\x00", True, "FrameError"),
        ("truncated body at EOF", _header(1, 10) + b"\x93\x03", True, "FrameError"),
        (
            "truncated DATA payload at EOF",
            _header(2, 20) + DATA_HEADER.pack(1, 0, 0) + b"abc",
            True,
            "FrameError",
        ),
        ("msgpack header bomb: nested array16 of 10000, 900 deep", msg(bomb), False, "DecodeError"),
        ("empty message body", msg(b""), False, "DecodeError"),
        ("never-used msgpack byte 0xc1", msg(b"\xc1"), False, "DecodeError"),
        (
            "trailing bytes after the envelope",
            msg(codec.packb([3, "x", {}]) + b"\xc0"),
            False,
            "DecodeError",
        ),
        ("two envelopes in one body", msg(codec.packb([3, "x", {}]) * 2), False, "DecodeError"),
        ("truncated msgpack inside a complete frame", msg(b"\x93\x03\xa1x"), False, "DecodeError"),
        (
            "ext type (fixext1) in params",
            msg(b"\x93\x03\xa1x\x81\xa1a\xd4\x01\x00"),
            False,
            "DecodeError",
        ),
        (
            "timestamp ext (-1) in params",
            msg(b"\x93\x03\xa1x\x81\xa1a\xd6\xff\x00\x00\x00\x00"),
            False,
            "DecodeError",
        ),
        ("integer map key", msg(b"\x93\x03\xa1x\x81\x01\x02"), False, "DecodeError"),
        ("binary map key", msg(b"\x93\x03\xa1x\x81\xc4\x01a\x02"), False, "DecodeError"),
        ("nil map key", msg(b"\x93\x03\xa1x\x81\xc0\x02"), False, "DecodeError"),
        ("duplicate map key", msg(b"\x93\x03\xa1x\x82\xa1a\x01\xa1a\x02"), False, "DecodeError"),
        ("invalid UTF-8 in a string", msg(b"\x93\x03\xa2\xc3\x28\x80"), False, "DecodeError"),
        (
            "nesting deeper than 32",
            msg(b"\x93\x03\xa1x" + b"\x91" * 40 + b"\xc0"),
            False,
            "DecodeError",
        ),
        ("envelope is a map", msg(codec.packb({"kind": 3})), False, "DecodeError"),
        ("envelope is an empty array", msg(b"\x90"), False, "DecodeError"),
        ("envelope kind 4", msg(codec.packb([4, "x", {}])), False, "DecodeError"),
        ("envelope kind is a boolean", msg(b"\x93\xc3\xa1x\x80"), False, "DecodeError"),
        ("envelope kind is a string", msg(codec.packb(["3", "x", {}])), False, "DecodeError"),
        ("request with 3 items", msg(codec.packb([0, 1, "ping"])), False, "DecodeError"),
        ("request with 5 items", msg(codec.packb([0, 1, "ping", {}, None])), False, "DecodeError"),
        ("request id negative", msg(codec.packb([0, -1, "ping", {}])), False, "DecodeError"),
        ("request id above u32", msg(codec.packb([0, 2**32, "ping", {}])), False, "DecodeError"),
        ("request id is a float", msg(codec.packb([0, 1.0, "ping", {}])), False, "DecodeError"),
        ("request method is binary", msg(codec.packb([0, 1, b"ping", {}])), False, "DecodeError"),
        (
            "notification with 4 items",
            msg(codec.packb([3, "event", {}, None])),
            False,
            "DecodeError",
        ),
        ("notification method is an integer", msg(codec.packb([3, 1, {}])), False, "DecodeError"),
        ("response with 4 items", msg(codec.packb([1, 1, {}, None])), False, "DecodeError"),
        ("error with 4 items", msg(codec.packb([2, 1, -32601, "x"])), False, "DecodeError"),
        (
            "bye without its code",
            msg(codec.packb([3, "bye", {"reason": "x"}])),
            False,
            "DecodeError",
        ),
        (
            "response to a request never sent",
            msg(codec.packb([1, 77, {}])),
            False,
            "RemoteProtocolError",
        ),
        (
            "error for a request never sent",
            msg(codec.packb([2, 77, 4, "x", None])),
            False,
            "RemoteProtocolError",
        ),
        (
            "DATA frame nobody asked for",
            encode_data_frame_header(5, 0, 0, 3) + b"abc",
            False,
            "RemoteProtocolError",
        ),
        (
            "DATA_ZSTD frame nobody asked for",
            encode_data_frame_header(5, 0, 0, 3, compressed=True) + b"abc",
            False,
            "RemoteProtocolError",
        ),
    ]
    return {
        "description": (
            "Byte sequences a receiver must refuse (specs/PROTOCOL.md §2, §3, §9, §10). "
            "Receiver: a client-side connection in state OPEN (handshake done, default limits) "
            "with no requests outstanding. 'eof' true means the byte stream ends right after "
            "'hex'. 'error' is the fleetpush exception class raised (§9.3); all are "
            "RemoteProtocolError subclasses, 'close_code' is the bye code to send (§9.2)."
        ),
        "frames": [
            {
                "name": name,
                "hex": data.hex(),
                "eof": eof,
                "error": error,
                "close_code": 1009
                if error == "FrameTooLarge"
                else 1010
                if error == "VersionMismatch"
                else 1002,
            }
            for name, data, eof, error in cases
        ],
    }


def _content(n: int, salt: int) -> bytes:
    return bytes((i * 7 + salt) % 251 for i in range(n))


def manifest_vectors() -> dict[str, Any]:
    signers = {name: keys.private_key_from_seed(seed) for name, seed in SEEDS.items()}
    chunk_size = limits.MIN_CHUNK_SIZE
    contents = {"bin/thermo": _content(5000, 1), "etc/thermo.toml": _content(100, 2)}
    files = []
    for path, data in contents.items():
        chunks = [
            hashlib.sha256(data[i : i + chunk_size]).digest()
            for i in range(0, len(data), chunk_size)
        ]
        files.append(
            FileEntry(
                path=path,
                size=len(data),
                mode=0o755 if path.startswith("bin/") else 0o644,
                digest=hashlib.sha256(data).digest(),
                chunks=chunks,
            )
        )
    manifest = Manifest(
        app="thermo",
        version="1.3.0",
        sequence=4,
        created=CREATED,
        expires=EXPIRES,
        min_version="1.0.0",
        restart=True,
        notes="fixes the sensor drift",
        hash="sha256",
        chunk_size=chunk_size,
        files=files,
    )
    signed = manifest.to_bytes()
    sm = sign_manifest(signed, [signers["release_a"], signers["release_b"]])
    future = Manifest(
        app="thermo",
        version="1.4.0",
        sequence=5,
        created=CREATED,
        chunk_size=chunk_size,
        files=[],
        extra={"x-rollout": {"percent": 10}, "zz_note": "from a newer releaser"},
    )
    future_signed = future.to_bytes()
    future_sm = sign_manifest(future_signed, [signers["release_a"]])

    def key_entry(name: str) -> dict[str, str]:
        pub = keys.public_bytes(signers[name])
        return {
            "seed_hex": SEEDS[name].hex(),
            "public_key_hex": pub.hex(),
            "keyid": keys.keyid(pub),
        }

    variable = variable_manifest_vector(signers)
    device_pub = device_key_public()
    nonce = bytes(range(0xA0, 0xC0))
    payload = auth.auth_payload(
        server_id="releaser-1",
        cid="c-000001",
        nonce=nonce,
        role="device",
        peer_id="dev-0001",
        public_key=device_pub,
    )
    return {
        "description": (
            "A canonical signed manifest and a handshake auth signature (specs/PROTOCOL.md "
            "§5.2, §7.3, §8). Signatures are Ed25519 (RFC 8032) over domain || bytes."
        ),
        "keys": {name: key_entry(name) for name in MANIFEST_SEEDS},
        "manifest": {
            "fields": to_json(codec.to_wire(manifest)),
            "file_contents_hex": {p: d.hex() for p, d in contents.items()},
            "canonical_hex": signed.hex(),
            "sha256_of_canonical": hashlib.sha256(signed).hexdigest(),
            "domain_hex": MANIFEST_DOMAIN.hex(),
            "signatures": [
                {"signer": name, "keyid": s.keyid, "sig_hex": s.sig.hex()}
                for name, s in zip(("release_a", "release_b"), sm.signatures, strict=True)
            ],
            "signed_manifest_hex": codec.packb(codec.to_wire(sm)).hex(),
            "trust": {
                "trusted": ["release_a", "release_b", "release_c"],
                "threshold": 2,
                "app": "thermo",
                "high_water": 3,
                "installed_version": "1.2.0",
                "now": CREATED + 3600,
            },
        },
        "manifest_variable_chunks": variable,
        "manifest_with_unknown_fields": {
            "fields": to_json(codec.to_wire(future)),
            "unknown_keys": sorted(future.extra),
            "canonical_hex": future_signed.hex(),
            "signatures": [
                {
                    "signer": "release_a",
                    "keyid": future_sm.signatures[0].keyid,
                    "sig_hex": future_sm.signatures[0].sig.hex(),
                }
            ],
        },
        "auth": {
            "server_id": "releaser-1",
            "cid": "c-000001",
            "nonce_hex": nonce.hex(),
            "role": "device",
            "peer_id": "dev-0001",
            "public_key_hex": device_pub.hex(),
            "domain_hex": auth.DOMAIN.hex(),
            "payload_hex": payload.hex(),
            "signer": "device",
            "signature_hex": auth.sign_challenge(signers["device"], payload).hex(),
        },
    }


#: The cut points of the variable-chunk vector: fixed here, not found by a
#: chunker, since only the publisher runs one (§7.3.3) and any cut is valid.
VARIABLE_SIZES = [3000, 4096, 2904]


def variable_manifest_vector(signers: dict[str, Any]) -> dict[str, Any]:
    """A protocol 1.1 manifest with content-defined chunks (§7.3.3)."""
    chunk_size = limits.MIN_CHUNK_SIZE  # the chunker's maximum chunk size
    binary = _content(sum(VARIABLE_SIZES), 3)
    config = _content(100, 4)
    starts = [sum(VARIABLE_SIZES[:i]) for i in range(len(VARIABLE_SIZES))]
    files = [
        FileEntry(
            path="bin/thermo",
            size=len(binary),
            mode=0o755,
            digest=hashlib.sha256(binary).digest(),
            chunks=[
                hashlib.sha256(binary[o : o + n]).digest()
                for o, n in zip(starts, VARIABLE_SIZES, strict=True)
            ],
            sizes=list(VARIABLE_SIZES),
        ),
        # A file without sizes keeps fixed chunks, in the same manifest.
        FileEntry(
            path="etc/thermo.toml",
            size=len(config),
            mode=0o644,
            digest=hashlib.sha256(config).digest(),
            chunks=[hashlib.sha256(config).digest()],
        ),
    ]
    manifest = Manifest(
        app="thermo",
        version="1.4.0",
        sequence=5,
        created=CREATED,
        expires=EXPIRES,
        notes="content-defined chunks",
        chunk_size=chunk_size,
        files=files,
    )
    signed = manifest.to_bytes()
    sm = sign_manifest(signed, [signers["release_a"], signers["release_b"]])
    return {
        "note": (
            "protocol 1.1 (§7.3.3): 'sizes' lists each chunk's length; chunk_size is the "
            "chunker's maximum. 'chunk_spans' are the decoded (offset, length) of each chunk."
        ),
        "fields": to_json(codec.to_wire(manifest)),
        "file_contents_hex": {"bin/thermo": binary.hex(), "etc/thermo.toml": config.hex()},
        "chunk_spans": {
            f.path: [list(f.chunk_span(chunk_size, i)) for i in range(len(f.chunks))] for f in files
        },
        "canonical_hex": signed.hex(),
        "signatures": [
            {"signer": name, "keyid": s.keyid, "sig_hex": s.sig.hex()}
            for name, s in zip(("release_a", "release_b"), sm.signatures, strict=True)
        ],
        "signed_manifest_hex": codec.packb(codec.to_wire(sm)).hex(),
    }


def root_vectors() -> dict[str, Any]:
    """Root v1 and its rotation to v2 (specs/PROTOCOL.md §8.4, §8.5)."""
    k = {name: keys.private_key_from_seed(seed) for name, seed in SEEDS.items()}

    def kid(name: str) -> str:
        return keys.keyid(k[name])

    def pub(*names: str) -> dict[str, bytes]:
        return {kid(n): keys.public_bytes(k[n]) for n in names}

    v1 = Root(
        version=1,
        expires=EXPIRES,
        keys=pub("root_1", "release_a", "timestamp"),
        root=Role(keys=[kid("root_1")], threshold=1),
        release=Role(keys=[kid("release_a")], threshold=1),
        timestamp=Role(keys=[kid("timestamp")], threshold=1),
    )
    # v2: the root key rotates to root_2, the release role becomes 2-of-2 with
    # release_b added, and app thermo's high-water mark is lowered to 4 (§8.5).
    v2 = Root(
        version=2,
        expires=EXPIRES,
        keys=pub("root_2", "release_a", "release_b", "timestamp"),
        root=Role(keys=[kid("root_2")], threshold=1),
        release=Role(keys=sorted([kid("release_a"), kid("release_b")]), threshold=2),
        timestamp=Role(keys=[kid("timestamp")], threshold=1),
        sequence_resets={"thermo": 4},
    )

    def entry(root: Root, signers: list[str]) -> dict[str, Any]:
        raw = root.to_bytes()
        env = sign_root(raw, [k[n] for n in signers])
        return {
            "fields": to_json(codec.to_wire(root)),
            "canonical_hex": raw.hex(),
            "signatures": [
                {"signer": n, "keyid": s.keyid, "sig_hex": s.sig.hex()}
                for n, s in zip(signers, env.signatures, strict=True)
            ],
        }

    return {
        "description": (
            "Root documents (specs/PROTOCOL.md §8.4): v1 is self-signed by root_1; v2 is "
            "signed by root_1 (the trusted v1's root key) and root_2 (its own), so a device "
            "trusting v1 accepts it. Signatures are Ed25519 over domain || canonical bytes."
        ),
        "domain_hex": ROOT_DOMAIN.hex(),
        "keys": {
            n: {"seed_hex": SEEDS[n].hex(), "keyid": kid(n)}
            for n in ("root_1", "root_2", "release_a", "release_b", "timestamp")
        },
        "v1": entry(v1, ["root_1"]),
        "v2": entry(v2, ["root_1", "root_2"]),
        "refused": {
            "v2 signed only by root_2 (the new key)": "UnknownKey",
            "v2 signed only by root_1 (the old key)": "UnknownKey",
        },
        "freshness": _freshness_vector(k["timestamp"]),
    }


def _freshness_vector(key: Any) -> dict[str, Any]:
    """A freshness statement authorising one push (§8.6), signed by v1's timestamp key."""
    cmd = m.UpdateCommand(app="thermo", version="1.3.0", restart=True, push_id="push-1")
    digest = command_digest("__force_update__", cmd)
    f = Freshness(
        server_id="releaser-1",
        counter=42,
        issued=CREATED,
        expires=CREATED + 3600,
        nonce=bytes(range(0x40, 0x60)),
        sequences={"thermo": {"stable": 4}},
        command=digest,
    )
    env = sign_freshness(f, [key])
    return {
        "domain_hex": FRESHNESS_DOMAIN.hex(),
        "command": {"method": "__force_update__", **codec.to_wire(cmd)},
        "command_digest_hex": digest.hex(),
        "fields": to_json(codec.to_wire(f)),
        "canonical_hex": env.signed.hex(),
        "signatures": [
            {
                "signer": "timestamp",
                "keyid": env.signatures[0].keyid,
                "sig_hex": env.signatures[0].sig.hex(),
            }
        ],
    }


def build() -> dict[str, Any]:
    """Every vector file's content, by file name."""
    return {
        "frames.json": valid_frames(),
        "invalid_frames.json": invalid_frames(),
        "manifest.json": manifest_vectors(),
        "root.json": root_vectors(),
    }


def render(content: Any) -> str:
    return json.dumps(content, indent=2, sort_keys=False) + "\n"


def main() -> int:
    for name, content in build().items():
        (HERE / name).write_text(render(content), encoding="utf-8")
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
