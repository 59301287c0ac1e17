"""`fleetpush release publish|list|promote|revoke`.

``publish`` works on the releaser's data directory directly (it needs the
files and the release signing keys, and the private release key should never
have to travel to the releaser); every other subcommand is an operator
request over the wire.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from fleetpush.operator import OperatorClient
from fleetpush.protocol import FleetpushError
from fleetpush.protocol.messages import ReleaseInfo

from . import output
from .console import (
    config_parent,
    connection_parent,
    fail,
    json_parent,
    load_private_key,
    print_json,
    resolve,
    run_operator,
)
from .exitcodes import EXIT_OK
from .failures import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("release", help="publish and manage releases")
    rs = p.add_subparsers(dest="release_command", metavar="SUBCOMMAND", required=True)

    pub = rs.add_parser(
        "publish",
        parents=[config_parent()],
        help="publish a directory as a new release (draft)",
        description=(
            "Sign DIR's files as release APP VERSION and store it in the releaser's data "
            "directory, as a draft. Works on the data directory directly (local or shared "
            "storage): publishing needs the files and the release signing keys, which never "
            "go over the wire. Promote it afterwards with `fleetpush release promote`."
        ),
    )
    pub.add_argument("dir", type=Path, metavar="DIR", help="directory holding the release files")
    pub.add_argument("--app", required=True, help="application name")
    pub.add_argument("--version", required=True, help="release version (PEP 440)")
    pub.add_argument("--notes", default="", help="release notes")
    pub.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="devices restart the app to apply it (default: --restart)",
    )
    pub.add_argument(
        "--key",
        type=Path,
        action="append",
        metavar="KEYFILE",
        help="release signing key (repeat for k-of-n; default: release_keys from the config)",
    )
    pub.add_argument("--sequence", type=int, help="sequence number (default: app's highest + 1)")
    pub.add_argument(
        "--hash",
        choices=["sha256", "blake3"],
        default="sha256",
        help="chunk and file digest (blake3 is faster; devices need the blake3 package)",
    )
    pub.add_argument(
        "--chunking",
        choices=["cdc", "fixed"],
        default="cdc",
        help="cdc (default): content-defined chunks, so an edit re-sends only the chunks "
        "around it; needs devices on fleetpush protocol 1.1. fixed: 1 MiB chunks every "
        "device reads (for fleets with older devices)",
    )
    pub.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep zstd copies of the chunks it shrinks by 10%% or more, sent compressed to "
        "devices that can take them (default: --compress)",
    )
    pub.add_argument(
        "--schema-version",
        type=int,
        metavar="N",
        help="the data schema this release's code writes (devices refuse it on newer data "
        "and run their migrate_command when their data is older)",
    )
    pub.add_argument(
        "--min-schema",
        type=int,
        metavar="M",
        help="the oldest data schema this release can migrate from (needs --schema-version)",
    )
    pub.add_argument("--data-dir", type=Path, metavar="DIR", help="the releaser's data directory")
    pub.add_argument(
        "--store",
        metavar="s3://BUCKET/PREFIX",
        help="upload the release files to this S3-compatible object store instead of the "
        "data dir (endpoint and credentials: --store-endpoint or AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, ...; needs the 's3' extra); the index stays in the database",
    )
    pub.add_argument(
        "--store-endpoint",
        metavar="URL",
        help="the object store's endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL)",
    )
    env = pub.add_argument_group(
        "Python environment",
        "ship the wheels the app needs; devices build a venv from them offline before they "
        "stop the app (README, 'Python services')",
    )
    env.add_argument(
        "--requirements",
        type=Path,
        metavar="FILE",
        help="requirements resolved and downloaded here with pip (binary wheels only)",
    )
    env.add_argument(
        "--wheelhouse",
        type=Path,
        metavar="DIR",
        help="prebuilt wheels: with --requirements the only source pip may use; "
        "without it every wheel in DIR is shipped",
    )
    env.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="module the device imports in the new env as its smoke check (repeatable)",
    )
    env.add_argument(
        "--python-version",
        metavar="X.Y",
        help="the devices' Python, if not this one (passed to pip download)",
    )
    env.add_argument(
        "--platform",
        dest="platforms",
        action="append",
        default=[],
        metavar="TAG",
        help="the devices' platform tag, e.g. manylinux2014_aarch64 (repeatable; pip download)",
    )
    pub.add_argument("--json", action="store_true", help="print the release as JSON")
    pub.set_defaults(func=_publish)

    ls = rs.add_parser("list", parents=[connection_parent(), json_parent()], help="list releases")
    ls.add_argument("--app", help="only this application")
    ls.set_defaults(func=_list)

    pr = rs.add_parser(
        "promote",
        parents=[connection_parent(), json_parent()],
        help="move a release to pre-released or approved",
        description="draft -> pre-released -> approved. Devices on channel stable are offered "
        "only approved releases; channel beta also pre-released ones. A release a halted "
        "deployment paused is set back the same way.",
    )
    pr.add_argument("app")
    pr.add_argument("version")
    pr.add_argument("status", choices=["pre-released", "approved"])
    pr.set_defaults(func=_promote)

    rv = rs.add_parser(
        "revoke",
        parents=[connection_parent(), json_parent()],
        help="revoke a release (never offered or pushed again)",
    )
    rv.add_argument("app")
    rv.add_argument("version")
    rv.set_defaults(func=_revoke)

    pg = rs.add_parser(
        "purge",
        parents=[config_parent()],
        help="delete a revoked release and its files (data dir or object store)",
        description=(
            "Delete revoked release APP VERSION from the releaser's database, then its files "
            "in the data directory or its objects in the object store. Works on the data "
            "directory directly, like publish."
        ),
    )
    pg.add_argument("app")
    pg.add_argument("version")
    pg.add_argument("--data-dir", type=Path, metavar="DIR", help="the releaser's data directory")
    pg.add_argument(
        "--store-endpoint",
        metavar="URL",
        help="the object store's endpoint (default: AWS_ENDPOINT_URL)",
    )
    pg.set_defaults(func=_purge)


def _publish(args: argparse.Namespace) -> int:
    try:
        cfg = resolve(args)
        if cfg.data_dir is None:
            raise UsageError("no data dir: pass --data-dir DIR or set data_dir in the config")
        key_files = list(args.key or cfg.release_keys)
        if not key_files:
            raise UsageError("no release key: pass --key KEYFILE or set release_keys")
        if not args.dir.is_dir():
            raise UsageError(f"{args.dir} is not a directory")
        if args.sequence is not None and args.sequence < 1:
            raise UsageError("--sequence must be >= 1")
        if args.min_schema is not None and args.schema_version is None:
            raise UsageError("--min-schema needs --schema-version")
        if args.min_schema is not None and args.min_schema > args.schema_version:
            raise UsageError(
                f"--min-schema {args.min_schema} is above --schema-version {args.schema_version}"
            )
        keys = [load_private_key(p, "release key") for p in key_files]
        from fleetpush.server import publish_release
        from fleetpush.server.errors import PublishError
        from fleetpush.server.pyenv_publish import resolve_env

        with tempfile.TemporaryDirectory(prefix="fleetpush-env-") as work:
            env = None
            if args.requirements is not None or args.wheelhouse is not None:
                try:
                    env = resolve_env(
                        Path(work),
                        requirements=args.requirements,
                        wheelhouse=args.wheelhouse,
                        imports=args.imports,
                        python_version=args.python_version,
                        platforms=args.platforms,
                    )
                except PublishError as e:
                    raise PublishError(f"release publish: {e}") from e
            elif args.imports or args.python_version or args.platforms:
                raise UsageError("--import, --python-version and --platform need --requirements "
                                 "or --wheelhouse")
            info = publish_release(
                cfg.data_dir,
                args.dir,
                app=args.app,
                version=args.version,
                notes=args.notes,
                restart=args.restart,
                signing_keys=keys,
                sequence=args.sequence,
                hash_algorithm=args.hash,
                operator=cfg.operator_name,
                env=env,
                schema_version=args.schema_version,
                min_schema=args.min_schema,
                chunking=args.chunking,
                compress=args.compress,
                store=_store(args),
            )
    except FleetpushError as e:
        return fail(e)
    if args.json:
        print_json(info)
    else:
        line = output.describe_release(info)
        if args.schema_version is not None:
            line += f", data schema {args.schema_version}"
            if args.min_schema is not None:
                line += f" (migrates from {args.min_schema})"
        print(line)
    return EXIT_OK


def _store(args: argparse.Namespace) -> Any:
    """The object store ``--store`` names, or None (the data dir). Raises ObjectStoreError."""
    if args.store is None:
        return None
    from fleetpush.server.artifacts import S3Store, StoreOptions

    return S3Store(args.store, StoreOptions(endpoint=args.store_endpoint))


def _purge(args: argparse.Namespace) -> int:
    try:
        cfg = resolve(args)
        if cfg.data_dir is None:
            raise UsageError("no data dir: pass --data-dir DIR or set data_dir in the config")
        from fleetpush.server.artifacts import StoreOptions
        from fleetpush.server.release_purge import purge_release

        where = purge_release(
            cfg.data_dir, args.app, args.version, StoreOptions(endpoint=args.store_endpoint)
        )
    except FleetpushError as e:
        return fail(e)
    print(f"{args.app} {args.version}: purged ({where})")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    async def body(op: OperatorClient) -> int:
        releases = await op.list_releases(app=args.app)
        if args.json:
            print_json(releases)
        else:
            output.print_releases(releases)
        return EXIT_OK

    return run_operator(args, body)


def _set_status(args: argparse.Namespace, status: str) -> int:
    async def body(op: OperatorClient) -> int:
        info: ReleaseInfo = await op.set_release_status(args.app, args.version, status)
        if args.json:
            print_json(info)
        else:
            print(f"{info.app} {info.version}: {info.status}")
        return EXIT_OK

    return run_operator(args, body)


def _promote(args: argparse.Namespace) -> int:
    return _set_status(args, args.status)


def _revoke(args: argparse.Namespace) -> int:
    return _set_status(args, "revoked")
