"""The demo's root of trust: root v1 at the start, root v2 rotating the release key.

What `fleetpush root init|sign|publish` do (README.md, "Root of trust"), called
directly: the root key stays in the demo's workspace, never with the releaser.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleetpush.protocol import keys
from fleetpush.protocol.root import Role, Root, envelope_to_json, sign_root
from fleetpush.server.roots import publish_root

#: Roots made by the demo expire after a year, like `fleetpush root init`'s.
YEAR = 365 * 86_400


def make_and_publish_root(
    workspace: Path,
    version: int,
    root_key: Ed25519PrivateKey,
    release_key: Ed25519PrivateKey,
) -> Path:
    """Write ``root-VERSION.json`` signed by ``root_key`` and publish it to the releaser's
    data dir; returns the file. Raises what publish_root raises."""
    rid, lid = keys.keyid(root_key), keys.keyid(release_key)
    root = Root(
        version=version,
        expires=int(time.time()) + YEAR,
        keys={rid: keys.public_bytes(root_key), lid: keys.public_bytes(release_key)},
        root=Role(keys=[rid], threshold=1),
        release=Role(keys=[lid], threshold=1),
    )
    # One root key signs both as the previous root's and as the new root's key.
    envelope = sign_root(root.to_bytes(), [root_key])
    path = workspace / f"root-{version}.json"
    path.write_bytes(envelope_to_json(envelope))
    data_dir = workspace / "releaser"
    data_dir.mkdir(mode=0o700, exist_ok=True)
    publish_root(data_dir, envelope, now=time.time())
    return path
