"""`fleetpush root init|sign|publish|show`: the root-of-trust key ceremony (README.md).

Roots are files (specs/PROTOCOL.md §8.5) made and signed offline: ``init``
writes an unsigned root (a first one, or the next version ``--from`` the
current one), ``sign`` adds the signature of a root key held on that machine,
``publish`` stores a fully signed root in the releaser's data directory (after
the device's own checks, server/roots.py), ``show`` prints it and whose
signatures it carries. The private root keys never go to the releaser.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from fleetpush.protocol import FleetpushError, keys
from fleetpush.protocol.errors import BadSignature, Conflict, TrustError
from fleetpush.protocol.messages import SignedManifest
from fleetpush.protocol.root import (
    Role,
    Root,
    add_root_signatures,
    describe,
    envelope_from_json,
    envelope_to_json,
    sign_root,
)

from .console import config_parent, fail, load_private_key, print_json, resolve
from .exitcodes import EXIT_OK
from .failures import UsageError

DAY = 86_400


class RootConflict(Conflict):
    """`root publish`: the data dir holds another root of that version, or no chain to it."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "root",
        help="make, sign, publish and show root-of-trust files (key ceremony)",
        description="The root names the keys devices trust: root keys (sign the next root), "
        "release keys (sign releases) and timestamp keys (sign freshness). Make and sign "
        "roots offline; publish them to the releaser's data directory.",
    )
    rs = p.add_subparsers(dest="root_command", metavar="ACTION", required=True)

    init = rs.add_parser(
        "init",
        help="write a new unsigned root (version 1, or the next one --from the current)",
    )
    init.add_argument(
        "--from",
        dest="previous",
        type=Path,
        metavar="FILE",
        help="the current root: keep its roles, bump its version",
    )
    init.add_argument(
        "--root-key",
        action="append",
        default=[],
        metavar="KEY",
        help="root public key: hex, a .pub file, or a private key file (repeat)",
    )
    init.add_argument(
        "--release-key",
        action="append",
        default=[],
        metavar="KEY",
        help="release public key (repeat)",
    )
    init.add_argument(
        "--timestamp-key",
        action="append",
        default=[],
        metavar="KEY",
        help="the releaser's online timestamp public key (repeat)",
    )
    init.add_argument("--threshold", type=int, metavar="N", help="root keys that must sign")
    init.add_argument("--release-threshold", type=int, metavar="N")
    init.add_argument("--timestamp-threshold", type=int, metavar="N")
    init.add_argument(
        "--expires",
        type=float,
        default=365,
        metavar="DAYS",
        help="days until the root expires (365)",
    )
    init.add_argument(
        "--reset-sequence",
        action="append",
        default=[],
        metavar="APP=SEQ",
        help="lower APP's sequence high-water mark on devices to SEQ "
        "(recovery from a fast-forward, PROTOCOL.md §8.5)",
    )
    init.add_argument("--out", type=Path, required=True, metavar="FILE")
    init.add_argument("--force", action="store_true", help="overwrite FILE")
    init.set_defaults(func=_init)

    sign = rs.add_parser("sign", help="add a root key's signature to FILE (offline)")
    sign.add_argument("file", type=Path, metavar="FILE")
    sign.add_argument(
        "--key",
        type=Path,
        action="append",
        required=True,
        metavar="KEYFILE",
        help="root private key (PEM; repeat)",
    )
    sign.set_defaults(func=_sign)

    pub = rs.add_parser(
        "publish",
        parents=[config_parent()],
        help="store a signed root in the releaser's data directory",
    )
    pub.add_argument("file", type=Path, metavar="FILE")
    pub.add_argument("--data-dir", type=Path, metavar="DIR", help="the releaser's data directory")
    pub.set_defaults(func=_publish)

    show = rs.add_parser("show", help="print a root file and who signed it")
    show.add_argument("file", type=Path, metavar="FILE")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)


# --- helpers -------------------------------------------------------------------------


def _public_key(text: str) -> bytes:
    """A public key from hex, a file holding hex (KEYFILE.pub), or a PEM private key file."""
    path = Path(text)
    if path.is_file():
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            return keys.public_bytes(load_private_key(path, "key"))
        text = data.decode(errors="replace")
    try:
        return keys.public_key_from_hex(text)
    except keys.KeyFormatError as e:
        raise UsageError(f"{text.strip()[:70]}: {e}") from e


def _role(raw: list[bytes], threshold: int | None, name: str) -> tuple[Role, dict[str, bytes]]:
    ids = list(dict.fromkeys(keys.keyid(k) for k in raw))
    k = threshold if threshold is not None else 1
    if not 1 <= k <= len(ids):
        raise UsageError(f"--{name}threshold {k} is not within 1..{len(ids)} keys")
    return Role(keys=ids, threshold=k), {keys.keyid(r): r for r in raw}


def read_root(path: Path) -> tuple[SignedManifest, Root]:
    """A root file and its decoded root. Raises UsageError naming the file."""
    try:
        env = envelope_from_json(path.read_bytes())
        return env, Root.from_bytes(env.signed)
    except OSError as e:
        raise UsageError(f"root {path}: cannot read it: {e.strerror or e}") from e
    except FleetpushError as e:
        raise UsageError(f"root {path}: {e}") from e


def _write(path: Path, env: SignedManifest, *, force: bool = True) -> None:
    if path.exists() and not force:
        raise UsageError(f"root {path}: exists; pass --force to overwrite it")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(envelope_to_json(env))
        tmp.replace(path)
    except OSError as e:
        raise UsageError(f"root {path}: cannot write it: {e.strerror or e}") from e


def _resets(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        app, sep, seq = item.partition("=")
        if not sep or not app or not seq.isdigit():
            raise UsageError(f"--reset-sequence {item!r} is not APP=SEQ")
        out[app] = int(seq)
    return out


def _named(e: FleetpushError, path: Path) -> UsageError:
    """``e`` as one sentence naming the root file: ``root FILE: why``."""
    text = str(e)
    return UsageError(text if text.startswith("root ") else f"root {path}: {text}")


# --- the actions -----------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    try:
        base: Root | None = read_root(args.previous)[1] if args.previous else None
        if base is None and not (args.root_key and args.release_key):
            raise UsageError("a first root needs --root-key and --release-key (or --from FILE)")
        all_keys: dict[str, bytes] = {}
        roles: dict[str, Role | None] = {}
        for name, given, threshold in (
            ("root", args.root_key, args.threshold),
            ("release", args.release_key, args.release_threshold),
            ("timestamp", args.timestamp_key, args.timestamp_threshold),
        ):
            if given:
                prefix = "" if name == "root" else f"{name}-"
                role, found = _role([_public_key(k) for k in given], threshold, prefix)
            elif base is not None and getattr(base, name) is not None:
                kept: Role = getattr(base, name)
                role = attrs.evolve(kept, threshold=threshold or kept.threshold)
                found = {k: base.keys[k] for k in role.keys}
            else:
                role, found = None, {}
            roles[name] = role
            all_keys.update(found)
        assert roles["root"] is not None and roles["release"] is not None
        root = Root(
            version=1 if base is None else base.version + 1,
            expires=int(time.time() + args.expires * DAY),
            keys=all_keys,
            root=roles["root"],
            release=roles["release"],
            timestamp=roles["timestamp"],
            sequence_resets=_resets(args.reset_sequence),
        )
        env = sign_root(root.to_bytes(), [])
        _write(args.out, env, force=args.force)
    except (UsageError, FleetpushError) as e:
        return fail(_named(e, args.out))
    print(
        f"wrote {args.out}: root version {root.version}, unsigned; sign it with "
        f"`fleetpush root sign {args.out} --key ROOTKEY`",
        file=sys.stderr,
    )
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    try:
        env, root = read_root(args.file)
        signers = [load_private_key(p, "root key") for p in args.key]
        allowed = set(root.root.keys)
        for k, path in zip(signers, args.key, strict=True):
            if keys.keyid(k) not in allowed:
                # A key of the previous root may sign the next one (§8.4): allowed,
                # but say so, since it is also the commonest mistake.
                print(
                    f"note: {path} is not a root key of version {root.version} itself "
                    "(right when it belongs to the previous root)",
                    file=sys.stderr,
                )
        _write(args.file, add_root_signatures(env, signers))
    except (UsageError, FleetpushError) as e:
        return fail(_named(e, args.file))
    print(f"signed {args.file} (root version {root.version})", file=sys.stderr)
    return EXIT_OK


def _publish(args: argparse.Namespace) -> int:
    try:
        cfg = resolve(args)
        if cfg.data_dir is None:
            raise UsageError("no data dir: pass --data-dir DIR or set data_dir in the config")
        env, _root = read_root(args.file)
        from fleetpush.server.roots import publish_root

        try:
            root, new = publish_root(cfg.data_dir, env, now=time.time())
        except Conflict as e:
            raise RootConflict(f"root {args.file}: {e}") from e
        except TrustError as e:
            raise UsageError(f"root {args.file}: {e}") from e
    except FleetpushError as e:
        return fail(e)
    if not new:
        print(f"root version {root.version} was already published to {cfg.data_dir}")
        return EXIT_OK
    print(
        f"published root version {root.version} to {cfg.data_dir}; devices walk to it "
        "when they next connect"
    )
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    try:
        env, root = read_root(args.file)
    except UsageError as e:
        return fail(e)
    view: dict[str, Any] = describe(root)
    sigs = []
    for s in env.signatures:
        public = root.keys.get(s.keyid)
        state = "not a key of this root"
        if public is not None:
            try:
                from fleetpush.protocol.root import ROOT_DOMAIN

                keys.verify(public, s.sig, ROOT_DOMAIN, env.signed)
                state = "valid"
            except BadSignature:
                state = "INVALID"
        sigs.append({"keyid": s.keyid, "signature": state})
    view["signatures"] = sigs
    if args.json:
        print_json(view)
        return EXIT_OK
    expires = datetime.fromtimestamp(root.expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"root version {root.version}, expires {expires}")
    for name in ("root", "release", "timestamp"):
        role = view[name]
        if role is None:
            print(f"  {name}: none")
            continue
        print(f"  {name}: {role['threshold']} of {len(role['keys'])}")
        for kid in role["keys"]:
            print(f"    {kid[:16]}")
    for app, seq in root.sequence_resets.items():
        print(f"  resets {app} to sequence {seq}")
    for entry in sigs:
        print(f"  signature {entry['keyid'][:16]}: {entry['signature']}")
    return EXIT_OK
