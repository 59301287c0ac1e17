"""`fleetpush operator web-login`: a one-time sign-in link for the web dashboard (issue 16).

The link carries a token signed here, offline, with the operator key; the
releaser trusts it because that key is one of its ``operator_keys``
(server/web/login.py). It names the operator as a CLI connection does, so the
audit history records web actions under the same ``name (key prefix)``.
"""

from __future__ import annotations

import argparse
import secrets
import time
from pathlib import Path

from .console import config_parent, load_private_key, print_json, resolve
from .exitcodes import EXIT_OK
from .failures import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("operator", help="operator sign-in for the web dashboard")
    ops = p.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    w = ops.add_parser(
        "web-login",
        parents=[config_parent()],
        help="print a one-time login link for the web dashboard",
        description=(
            "Sign a one-time login token with the operator key and print the dashboard's "
            "login link (or the token alone without --url). Open it within --ttl seconds; "
            "it works once. The releaser must list the key in operator_keys and serve the "
            "dashboard (fleetpush server --http HOST:PORT)."
        ),
    )
    w.add_argument(
        "--url", metavar="URL", help="the dashboard's address, e.g. https://releaser:8080"
    )
    w.add_argument("--operator-key", type=Path, metavar="KEYFILE", help="operator private key")
    w.add_argument("--name", metavar="NAME", help="operator name recorded by the releaser")
    w.add_argument(
        "--ttl", type=float, default=600.0, metavar="SECONDS",
        help="how long the link stays valid (default 600, at most 3600)",
    )
    w.add_argument("--json", action="store_true", help="print the link and token as JSON")
    w.set_defaults(func=_web_login)


def _web_login(args: argparse.Namespace) -> int:
    from fleetpush.server.web.login import MAX_TTL, make_token

    if not 0 < args.ttl <= MAX_TTL:
        raise UsageError(f"--ttl must be between 1 and {MAX_TTL:g} seconds")
    cfg = resolve(args)
    if cfg.operator_key is None:
        raise UsageError(
            "no operator key: pass --operator-key KEYFILE or set operator_key in the "
            "console config (make one with `fleetpush keygen`)"
        )
    key = load_private_key(cfg.operator_key, "operator key")
    token = make_token(
        key, cfg.operator_name, now=time.time(), nonce=secrets.token_bytes(16), ttl=args.ttl
    )
    link = None
    if args.url is not None:
        link = f"{args.url.rstrip('/')}/login?token={token}"
    if args.json:
        print_json({"token": token, "url": link, "expires_in": args.ttl})
    else:
        print(link or token, flush=True)
    return EXIT_OK
