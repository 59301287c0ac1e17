"""Generate the peer-token vector (specs/PROTOCOL.md §7.11): ``p2p_token.json``.

Run ``python specs/vectors/generate_p2p.py``. Deterministic like generate.py:
keys from fixed seeds, fixed times. tests/protocol/test_protocol_p2p.py checks
the checked-in file equals this output and that the token verifies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fleetpush.protocol import keys
from fleetpush.protocol.p2p import TOKEN_DOMAIN, PeerToken, sign_peer_token

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


if __name__ == "__main__":
    (HERE / "p2p_token.json").write_text(render())
    sys.stdout.write("wrote p2p_token.json\n")
