"""The implementation against specs/vectors/ (STYLE.md §5: whole, byte by byte, trailing)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from fleetpush.protocol import (
    BadSignature,
    DataFrame,
    FleetpushError,
    FrameDecoder,
    Manifest,
    MessageFrame,
    RemoteProtocolError,
    TrustRoot,
    auth,
    codec,
    errors,
    keys,
    verify_manifest,
)
from fleetpush.protocol import messages as m
from fleetpush.protocol.compression import decompress_chunk
from fleetpush.protocol.manifest import sign_manifest
from protocol_helpers import ConnectionPair, drain, iter_bytes, load_generator, load_vectors

GEN = load_generator()
FRAMES = load_vectors("frames.json")["frames"]
INVALID = load_vectors("invalid_frames.json")["frames"]
MANIFEST = load_vectors("manifest.json")

# A complete, valid frame to follow each case ("trailing bytes" feeding).
TRAILER = bytes.fromhex(FRAMES[0]["hex"])


def test_checked_in_vectors_are_what_generate_py_writes() -> None:
    for name, content in GEN.build().items():
        on_disk = (GEN.HERE / name).read_text(encoding="utf-8")
        assert on_disk == GEN.render(content), f"{name} is stale: run specs/vectors/generate.py"


def test_generation_is_deterministic() -> None:
    assert GEN.render(GEN.build()) == GEN.render(load_generator().build())


# --- valid frames ----------------------------------------------------------------


def _feed_whole(decoder: FrameDecoder, data: bytes) -> list[Any]:
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def _feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[Any]:
    out = []
    for byte in iter_bytes(data):
        decoder.feed(byte)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    return out


FEEDERS: dict[str, Callable[[FrameDecoder, bytes], list[Any]]] = {
    "whole": _feed_whole,
    "bytewise": _feed_bytewise,
}


def _check_frame(frame: Any, vector: dict[str, Any]) -> None:
    if vector["frame_type"] == 1:
        assert isinstance(frame, MessageFrame)
        assert frame.body.hex() == vector["body_hex"]
        assert codec.unpackb(frame.body) == GEN.from_json(vector["message"])
    else:
        assert isinstance(frame, DataFrame)
        assert (frame.stream, frame.file, frame.chunk) == (
            vector["stream"],
            vector["file"],
            vector["chunk"],
        )
        assert bytes(frame.payload).hex() == vector["payload_hex"]
        assert frame.compressed == (vector["frame_type"] == 3)
        if frame.compressed:  # DATA_ZSTD (§2.3.1): expands to exactly the chunk
            plain = decompress_chunk(frame.payload, vector["decompressed_length"])
            assert plain.hex() == vector["decompressed_hex"]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("trailing", [False, True], ids=["alone", "trailing"])
@pytest.mark.parametrize("vector", FRAMES, ids=[v["name"] for v in FRAMES])
def test_valid_frame_decodes(vector: dict[str, Any], feed: str, trailing: bool) -> None:
    data = bytes.fromhex(vector["hex"])
    assert int.from_bytes(data[4:8], "big") == vector["length"] == len(data) - 8
    decoder = FrameDecoder()
    frames = FEEDERS[feed](decoder, data + (TRAILER if trailing else b""))
    assert len(frames) == (2 if trailing else 1)
    _check_frame(frames[0], vector)
    if trailing:
        _check_frame(frames[1], FRAMES[0])
    assert decoder.buffered == 0
    decoder.feed(b"")
    assert decoder.next_frame() is None  # a clean EOF between frames is not an error


@pytest.mark.parametrize(
    "vector", [v for v in FRAMES if v["frame_type"] == 1], ids=lambda v: v["name"]
)
def test_message_vectors_encode_canonically(vector: dict[str, Any]) -> None:
    # Re-encoding the decoded envelope gives the very same bytes (§3.2).
    assert codec.packb(GEN.from_json(vector["message"])).hex() == vector["body_hex"]


# --- invalid frames ----------------------------------------------------------------


def _feed_connection(conn: Any, chunks: list[bytes], eof: bool) -> None:
    for chunk in chunks:
        conn.receive_data(chunk, 0.0)
        drain(conn)
    if eof:
        conn.receive_data(b"", 0.0)
        drain(conn)


# "trailing" is left out for truncated-at-EOF cases: followed by more bytes
# they are no longer truncated.
INVALID_CASES = [
    pytest.param(vector, how, id=f"{vector['name']}-{how}")
    for vector in INVALID
    for how in ("whole", "bytewise", "trailing")
    if not (how == "trailing" and vector["eof"])
]


@pytest.mark.parametrize(("vector", "how"), INVALID_CASES)
def test_invalid_frame_is_refused(vector: dict[str, Any], how: str) -> None:
    data = bytes.fromhex(vector["hex"])
    if how == "trailing":
        data += TRAILER
    conn = ConnectionPair().handshake().client
    chunks = list(iter_bytes(data)) if how == "bytewise" else [data]
    with pytest.raises(FleetpushError) as info:
        _feed_connection(conn, chunks, vector["eof"])
    assert type(info.value).__name__ == vector["error"], str(info.value)
    assert isinstance(info.value, RemoteProtocolError)
    assert info.value.close_code == vector["close_code"]
    # §2.4, §3.3: the refusal is answered by our bye with that code; whatever
    # the peer sent (a malformed bye included) must not have closed us first.
    bye = conn.close(info.value.close_code, str(info.value))
    assert codec.unpackb(bye[8:])[:2] == [3, "bye"]
    assert codec.unpackb(bye[8:])[2]["code"] == vector["close_code"]


def test_invalid_vector_error_names_are_real_classes() -> None:
    for vector in INVALID:
        cls = getattr(errors, vector["error"])
        assert issubclass(cls, RemoteProtocolError)


# --- manifest and auth -----------------------------------------------------------------


def _key(name: str) -> Any:
    return keys.private_key_from_seed(bytes.fromhex(MANIFEST["keys"][name]["seed_hex"]))


def test_key_vectors() -> None:
    for name, entry in MANIFEST["keys"].items():
        public = keys.public_bytes(_key(name))
        assert public.hex() == entry["public_key_hex"]
        assert keys.keyid(public) == entry["keyid"]


def test_manifest_canonical_bytes_and_signatures() -> None:
    vec = MANIFEST["manifest"]
    fields = GEN.from_json(vec["fields"])
    manifest = codec.from_wire(Manifest, fields)
    canonical = bytes.fromhex(vec["canonical_hex"])
    assert manifest.to_bytes() == canonical
    assert Manifest.from_bytes(canonical) == manifest
    for f in manifest.files:
        content = bytes.fromhex(vec["file_contents_hex"][f.path])
        assert len(content) == f.size
    signed = sign_manifest(canonical, [_key(s["signer"]) for s in vec["signatures"]])
    assert [(s.keyid, s.sig.hex()) for s in signed.signatures] == [
        (s["keyid"], s["sig_hex"]) for s in vec["signatures"]
    ]
    wire = codec.unpackb(bytes.fromhex(vec["signed_manifest_hex"]))
    assert codec.from_wire(m.SignedManifest, wire) == signed


def test_manifest_vector_verifies_under_its_trust_context() -> None:
    vec = MANIFEST["manifest"]
    ctx = vec["trust"]
    root = TrustRoot.from_public_keys(
        [bytes.fromhex(MANIFEST["keys"][n]["public_key_hex"]) for n in ctx["trusted"]],
        ctx["threshold"],
    )
    signed = codec.from_wire(
        m.SignedManifest, codec.unpackb(bytes.fromhex(vec["signed_manifest_hex"]))
    )
    verified = verify_manifest(
        root,
        signed,
        app=ctx["app"],
        high_water=ctx["high_water"],
        now=ctx["now"],
        installed_version=ctx["installed_version"],
    )
    assert verified.advances
    assert verified.signers == {s["keyid"] for s in vec["signatures"]}
    # One bit flipped in the signed bytes and the same signatures fail.
    flipped = bytearray(signed.signed)
    flipped[-1] ^= 1
    with pytest.raises(BadSignature):
        verify_manifest(
            root,
            m.SignedManifest(signed=bytes(flipped), signatures=signed.signatures),
            app=ctx["app"],
            high_water=ctx["high_water"],
            now=ctx["now"],
            installed_version=ctx["installed_version"],
        )


def test_variable_chunk_manifest_vector() -> None:
    # §7.3.3: sizes travel in the signed bytes; chunk_span cuts the file at them.
    vec = MANIFEST["manifest_variable_chunks"]
    canonical = bytes.fromhex(vec["canonical_hex"])
    manifest = Manifest.from_bytes(canonical)
    assert codec.to_wire(manifest) == GEN.from_json(vec["fields"])
    assert manifest.to_bytes() == canonical
    assert manifest.variable_chunks
    for f in manifest.files:
        content = bytes.fromhex(vec["file_contents_hex"][f.path])
        spans = [list(f.chunk_span(manifest.chunk_size, i)) for i in range(len(f.chunks))]
        assert spans == vec["chunk_spans"][f.path]
        for (offset, length), digest in zip(spans, f.chunks, strict=True):
            assert hashlib.sha256(content[offset : offset + length]).digest() == digest
    signed = sign_manifest(canonical, [_key(s["signer"]) for s in vec["signatures"]])
    assert [(s.keyid, s.sig.hex()) for s in signed.signatures] == [
        (s["keyid"], s["sig_hex"]) for s in vec["signatures"]
    ]
    wire = codec.unpackb(bytes.fromhex(vec["signed_manifest_hex"]))
    assert codec.from_wire(m.SignedManifest, wire) == signed


def test_manifest_unknown_fields_vector() -> None:
    vec = MANIFEST["manifest_with_unknown_fields"]
    canonical = bytes.fromhex(vec["canonical_hex"])
    manifest = Manifest.from_bytes(canonical)
    assert sorted(manifest.extra) == vec["unknown_keys"]
    assert manifest.to_bytes() == canonical  # kept, and re-encoded in place
    sig = vec["signatures"][0]
    keys.verify(
        bytes.fromhex(MANIFEST["keys"][sig["signer"]]["public_key_hex"]),
        bytes.fromhex(sig["sig_hex"]),
        bytes.fromhex(MANIFEST["manifest"]["domain_hex"]),
        canonical,
    )


def test_auth_payload_vector() -> None:
    vec = MANIFEST["auth"]
    payload = auth.auth_payload(
        server_id=vec["server_id"],
        cid=vec["cid"],
        nonce=bytes.fromhex(vec["nonce_hex"]),
        role=vec["role"],
        peer_id=vec["peer_id"],
        public_key=bytes.fromhex(vec["public_key_hex"]),
    )
    assert payload.hex() == vec["payload_hex"]
    assert auth.DOMAIN.hex() == vec["domain_hex"]
    signature = bytes.fromhex(vec["signature_hex"])
    assert auth.sign_challenge(_key(vec["signer"]), payload) == signature
    auth.verify_challenge(bytes.fromhex(vec["public_key_hex"]), signature, payload)
    other = auth.auth_payload(
        server_id=vec["server_id"],
        cid="c-000002",  # another session: the same signature must not verify
        nonce=bytes.fromhex(vec["nonce_hex"]),
        role=vec["role"],
        peer_id=vec["peer_id"],
        public_key=bytes.fromhex(vec["public_key_hex"]),
    )
    with pytest.raises(BadSignature):
        auth.verify_challenge(bytes.fromhex(vec["public_key_hex"]), signature, other)


# --- root documents (root.json, specs/PROTOCOL.md §8.4) ----------------------------

ROOTS = load_vectors("root.json")


def _root_envelope(entry: dict[str, Any]) -> m.SignedManifest:
    sigs = [
        m.Signature(keyid=s["keyid"], sig=bytes.fromhex(s["sig_hex"])) for s in entry["signatures"]
    ]
    return m.SignedManifest(signed=bytes.fromhex(entry["canonical_hex"]), signatures=sigs)


def test_root_vectors_encode_canonically_and_walk() -> None:
    from fleetpush.protocol.root import ROOT_DOMAIN, Root, load_trusted_root, update_root

    assert ROOT_DOMAIN.hex() == ROOTS["domain_hex"]
    for name in ("v1", "v2"):
        entry = ROOTS[name]
        root = Root.from_bytes(bytes.fromhex(entry["canonical_hex"]))
        assert codec.to_wire(root) == GEN.from_json(entry["fields"])
        assert root.to_bytes().hex() == entry["canonical_hex"]
    v1 = load_trusted_root(_root_envelope(ROOTS["v1"])).root
    v2 = update_root(v1, _root_envelope(ROOTS["v2"])).root
    assert v2.version == 2 and v2.sequence_resets == {"thermo": 4}
    assert v2.trust("release").threshold == 2


@pytest.mark.parametrize("signer", ["root_1", "root_2"])
def test_root_vector_signed_by_one_side_only_is_refused(signer: str) -> None:
    from fleetpush.protocol.root import load_trusted_root, update_root

    v1 = load_trusted_root(_root_envelope(ROOTS["v1"])).root
    env = _root_envelope(ROOTS["v2"])
    one = m.SignedManifest(
        signed=env.signed,
        signatures=[s for s in env.signatures if s.keyid == ROOTS["keys"][signer]["keyid"]],
    )
    with pytest.raises(errors.UnknownKey):
        update_root(v1, one)


def test_freshness_vector_verifies_for_its_command() -> None:
    from fleetpush.protocol.freshness import Freshness, command_digest, verify_freshness
    from fleetpush.protocol.root import load_trusted_root

    vec = ROOTS["freshness"]
    v1 = load_trusted_root(_root_envelope(ROOTS["v1"])).root
    cmd = dict(vec["command"])
    method = cmd.pop("method")
    digest = command_digest(method, m.UpdateCommand(**cmd))
    assert digest.hex() == vec["command_digest_hex"]
    f = verify_freshness(
        v1.trust("timestamp"),
        _root_envelope(vec),
        nonce=bytes(range(0x40, 0x60)),
        last_counter=42,
        now=vec["fields"]["issued"],
        command=digest,
    )
    assert codec.to_wire(f) == GEN.from_json(vec["fields"])
    assert (
        Freshness.from_bytes(bytes.fromhex(vec["canonical_hex"])).to_bytes().hex()
        == vec["canonical_hex"]
    )
