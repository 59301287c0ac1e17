"""`fleetpush keygen`: make an Ed25519 key pair (release, operator or device key)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fleetpush.net.keys import generate_private_key
from fleetpush.protocol.keys import keyid, private_key_to_pem, public_bytes

from .console import fail, print_json
from .exitcodes import EXIT_OK
from .failures import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair",
        description=(
            "Write a new Ed25519 private key (PEM, mode 0600) to KEYFILE and its public key "
            "as hex to KEYFILE.pub, and print the public key. Use it for release keys "
            "(trusted by devices), operator keys (listed in the releaser's config) and "
            "device keys."
        ),
    )
    p.add_argument("--out", type=Path, required=True, metavar="KEYFILE", help="private key file")
    p.add_argument("--force", action="store_true", help="overwrite an existing KEYFILE")
    p.add_argument("--json", action="store_true", help="print the public key and key id as JSON")
    p.set_defaults(func=_keygen)


def write_keypair(out: Path, *, force: bool = False) -> bytes:
    """Write ``out`` (PEM, 0600) and ``out.pub`` (hex); returns the raw public key.

    Raises :class:`UsageError` if ``out`` exists (without ``force``) or cannot be written.
    """
    key = generate_private_key()
    pem = private_key_to_pem(key)
    raw = public_bytes(key)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(out, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{out} exists; pass --force to overwrite it") from None
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, 0o600)  # O_TRUNC on an existing file keeps its old mode
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub = out.with_name(out.name + ".pub")
    try:
        pub.write_text(raw.hex() + "\n")
    except OSError as e:
        raise UsageError(f"cannot write {pub}: {e.strerror or e}") from e
    return raw


def _keygen(args: argparse.Namespace) -> int:
    try:
        raw = write_keypair(args.out, force=args.force)
    except UsageError as e:
        return fail(e)
    if args.json:
        print_json({"private_key": str(args.out), "public_key": raw.hex(), "keyid": keyid(raw)})
    else:
        print(raw.hex())
        print(f"private key: {args.out} (mode 0600); public key: {args.out}.pub", file=sys.stderr)
    return EXIT_OK
