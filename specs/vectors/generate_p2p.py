"""Generate the peer-delivery vectors (specs/PROTOCOL.md §7.11).

``p2p_token.json``: the peer token. ``p2p_messages.json``: a frame for each
peer-delivery message, request and answer (``get_peers``, ``report_peer``,
``p2p_bytes``, ``present_token``, ``p2p_view``), in the shape of
frames.json's message vectors (JSON cannot hold bytes: a byte string inside
``message`` is ``{"$bin": "<hex>"}``).

Run ``python specs/vectors/generate_p2p.py``. Deterministic like generate.py:
keys from fixed seeds, fixed times. tests/protocol/test_protocol_p2p.py checks
the checked-in token equals this output and that it verifies;
tests/protocol/test_protocol_p2p_vectors.py does the same for the messages
and decodes each frame whole, byte by byte and followed by another frame.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fleetpush.protocol import codec, keys
from fleetpush.protocol.frames import encode_message_frame
from fleetpush.protocol.messages import Empty, SignedManifest
from fleetpush.protocol.p2p import (
    TOKEN_DOMAIN,
    GetPeers,
    PeerAddr,
    PeerBytes,
    PeerList,
    PeerToken,
    PresentToken,
    ReportPeer,
    sign_peer_token,
)
from fleetpush.protocol.p2p_view import BadPeerReport, P2PQuery, P2PView

HERE = Path(__file__).resolve().parent
TIMESTAMP_SEED = b"t" * 32
ASKER_SEED = b"d" * 32
ISSUED = 1_767_225_600


def vector() -> dict[str, Any]:
    ts = keys.private_key_from_seed(TIMESTAMP_SEED)
    asker = keys.private_key_from_seed(ASKER_SEED)
    token = PeerToken(
        server_id="fp-1",
        issued=ISSUED,
        expires=ISSUED + 900,
        asker="dev-a",
        asker_key=keys.public_bytes(asker),
        app="demo",
        version="2.0",
        peers=["dev-b", "dev-c"],
    )
    signed = sign_peer_token(token, [ts])
    return {
        "description": (
            "A peer token (specs/PROTOCOL.md §7.11) signed by the timestamp key: "
            "Ed25519 over domain || canonical msgpack bytes. It verifies for "
            "me=dev-b or dev-c, asker dev-a with asker_public_hex, demo 2.0, "
            "at issued <= now < expires."
        ),
        "domain_hex": TOKEN_DOMAIN.hex(),
        "timestamp_seed_hex": TIMESTAMP_SEED.hex(),
        "timestamp_public_hex": keys.public_bytes(ts).hex(),
        "asker_seed_hex": ASKER_SEED.hex(),
        "asker_public_hex": keys.public_bytes(asker).hex(),
        "fields": {
            "format": 1,
            "server_id": "fp-1",
            "issued": ISSUED,
            "expires": ISSUED + 900,
            "asker": "dev-a",
            "app": "demo",
            "version": "2.0",
            "peers": ["dev-b", "dev-c"],
        },
        "canonical_hex": signed.signed.hex(),
        "signatures": [{"keyid": s.keyid, "sig_hex": s.sig.hex()} for s in signed.signatures],
    }


def render() -> str:
    return json.dumps(vector(), indent=2, sort_keys=False) + "\n"


def _json(value: Any) -> Any:
    """A decoded msgpack value as JSON (bytes become ``{"$bin": hex}``, as generate.py)."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def _frame(name: str, method: str, envelope: list[Any], note: str) -> dict[str, Any]:
    body = codec.packb(envelope)
    return {
        "name": name,
        "method": method,
        "note": note,
        "hex": encode_message_frame(body).hex(),
        "frame_type": 1,
        "length": len(body),
        "body_hex": body.hex(),
        "message": _json(envelope),
    }


def messages() -> dict[str, Any]:
    """One frame per peer-delivery message; the token is :func:`vector`'s."""
    token = sign_peer_token(
        PeerToken(
            server_id="fp-1",
            issued=ISSUED,
            expires=ISSUED + 900,
            asker="dev-a",
            asker_key=keys.public_bytes(keys.private_key_from_seed(ASKER_SEED)),
            app="demo",
            version="2.0",
            peers=["dev-b", "dev-c"],
        ),
        [keys.private_key_from_seed(TIMESTAMP_SEED)],
    )
    wire = codec.to_wire
    signed: SignedManifest = token
    frames = [
        _frame(
            "request: get_peers",
            "get_peers",
            [0, 21, "get_peers", wire(GetPeers(app="demo", version="2.0",
                subnet="192.168.4.0/24", host="192.168.4.20", port=7879))],
            "device to releaser; subnet and host are what the device reports "
            "(host: p2p_host, else its bound p2p_listen, else the local address of this link)",
        ),
        _frame(
            "response: get_peers result",
            "get_peers",
            [1, 21, wire(PeerList(peers=[
                PeerAddr(device_id="dev-b", host="192.168.4.21", port=7879),
                PeerAddr(device_id="dev-c", host="192.168.4.22", port=7879),
            ], token=signed))],
            "the token is p2p_token.json's: signed bytes and signatures as sent",
        ),
        _frame(
            "response: get_peers result, no near holder",
            "get_peers",
            [1, 22, wire(PeerList())],
            "no peers: token is nil; the device downloads from the releaser alone",
        ),
        _frame(
            "request: report_peer",
            "report_peer",
            [0, 23, "report_peer", wire(ReportPeer(app="demo", version="2.0", peer_id="dev-c",
                reason="corrupt", peer_bytes=1048576))],
            "a chunk from dev-c failed its digest; only 'corrupt' is sent by agents today",
        ),
        _frame("response: report_peer result", "report_peer", [1, 23, wire(Empty())],
               "an empty map"),
        _frame(
            "notification: p2p_bytes",
            "p2p_bytes",
            [3, "p2p_bytes", wire(PeerBytes(app="demo", version="2.0", from_peers=6291456,
                from_releaser=2097152))],
            "after the download: how the release arrived",
        ),
        _frame(
            "request: present_token",
            "present_token",
            [0, 3, "present_token", wire(PresentToken(app="demo", version="2.0", token=signed))],
            "device to device, after hello and auth on the serving device's port",
        ),
        _frame("response: present_token result", "present_token", [1, 3, wire(Empty())],
               "accepted: get_manifest and get_chunks of demo 2.0 may follow"),
        _frame(
            "request: p2p_view",
            "p2p_view",
            [0, 31, "p2p_view", wire(P2PQuery(app="demo", version="2.0", deployment_id="d-7"))],
            "operator; a nil field (device_id here) narrows nothing",
        ),
        _frame(
            "response: p2p_view result",
            "p2p_view",
            [1, 31, wire(P2PView(
                reports=[BadPeerReport(device_id="dev-c", app="demo", version="2.0",
                    reporter="dev-a", reason="corrupt", at=float(ISSUED + 60))],
                from_peers=6291456, from_releaser=2097152, downloads=1,
            ))],
            "byte sums over deployment d-7's devices; reports newest first, at most 1000",
        ),
    ]  # fmt: skip
    return {
        "description": (
            "Peer-delivery messages (specs/PROTOCOL.md §7.11) as framed on the wire. "
            "Each body decodes to its message; params and results parse to the "
            "method's classes and re-encode to the same bytes."
        ),
        "frames": frames,
    }


def render_messages() -> str:
    return json.dumps(messages(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    (HERE / "p2p_token.json").write_text(render())
    (HERE / "p2p_messages.json").write_text(render_messages())
    sys.stdout.write("wrote p2p_token.json and p2p_messages.json\n")
