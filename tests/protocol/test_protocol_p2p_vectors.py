"""The peer-delivery messages against specs/vectors/p2p_messages.json (§7.11).

Each frame is fed whole, one byte at a time, and followed by another frame
(STYLE.md §5); its body is the message; its params or result parse to the
method's registered classes and re-encode to the very same bytes.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import pytest
from fleetpush.protocol import FrameDecoder, MessageFrame, codec
from fleetpush.protocol.messages import METHODS
from protocol_helpers import VECTORS, iter_bytes, load_generator, load_vectors


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fp_gen_p2p_msgs", VECTORS / "generate_p2p.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FRAMES = load_vectors("p2p_messages.json")["frames"]
FROM_JSON = load_generator().from_json
TRAILER = bytes.fromhex(FRAMES[0]["hex"])
P2P_METHODS = ("get_peers", "report_peer", "p2p_bytes", "present_token", "p2p_view")


def test_checked_in_messages_are_what_generate_p2p_writes() -> None:
    gen = _generator()
    assert (VECTORS / "p2p_messages.json").read_text(encoding="utf-8") == gen.render_messages()
    assert gen.render_messages() == _generator().render_messages()  # deterministic


def test_every_peer_delivery_method_has_its_request_and_answer() -> None:
    for method in P2P_METHODS:
        kinds = {f["message"][0] for f in FRAMES if f["method"] == method}
        # a request and its result, or a notification (kind 3)
        assert kinds in ({0, 1}, {3}), (method, kinds)


def _decode(data: bytes, bytewise: bool) -> list[Any]:
    decoder = FrameDecoder()
    out = []
    for piece in iter_bytes(data) if bytewise else [data]:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert decoder.buffered == 0
    return out


@pytest.mark.parametrize("how", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize("vector", FRAMES, ids=[f["name"] for f in FRAMES])
def test_p2p_frame_decodes_to_its_message(vector: dict[str, Any], how: str) -> None:
    data = bytes.fromhex(vector["hex"])
    assert int.from_bytes(data[4:8], "big") == vector["length"] == len(data) - 8
    frames = _decode(data + (TRAILER if how == "trailing" else b""), how == "bytewise")
    assert len(frames) == (2 if how == "trailing" else 1)
    frame = frames[0]
    assert isinstance(frame, MessageFrame)
    assert frame.body.hex() == vector["body_hex"]
    assert codec.unpackb(frame.body) == FROM_JSON(vector["message"])


@pytest.mark.parametrize("vector", FRAMES, ids=[f["name"] for f in FRAMES])
def test_p2p_message_parses_to_its_class_and_reencodes_canonically(vector: dict[str, Any]) -> None:
    envelope = FROM_JSON(vector["message"])
    spec = METHODS[vector["method"]]
    kind = envelope[0]
    if kind == 1:  # a result: [1, id, result]
        assert spec.result is not None
        cls, payload = spec.result, envelope[2]
    else:  # a request [0, id, method, params] or a notification [3, method, params]
        assert envelope[-2] == vector["method"]
        cls, payload = spec.params, envelope[-1]
    parsed = codec.from_wire(cls, payload, vector["name"])
    again = [*envelope[:-1], codec.to_wire(parsed)]
    assert codec.packb(again).hex() == vector["body_hex"]
