"""The demo's one dependency: a tiny pure-Python wheel, written here so the demo
runs offline (issue 12: 1.1.0 of the demo app adds it to its requirements).

A wheel is a zip with the package, its METADATA, WHEEL and a RECORD of
hashes (PEP 427); pip and uv install it like any other. Only the demo makes
one: real releases ship wheels resolved by pip (``release publish
--requirements`` / ``--wheelhouse``).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

NAME = "demo_units"
VERSION = "1.0"

_MODULE = '''"""Unit conversions for the demo sensor (shipped as a wheel in its release)."""

__version__ = "1.0"


def celsius(fahrenheit: float) -> float:
    return (fahrenheit - 32) * 5 / 9
'''


def _digest(data: bytes) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={raw}"


def write_wheel(out_dir: Path) -> Path:
    """``out_dir/demo_units-1.0-py3-none-any.whl`` (the same bytes every time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = f"{NAME}-{VERSION}.dist-info"
    files = {
        f"{NAME}/__init__.py": _MODULE.encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fleetpush-demo\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},{_digest(d)},{len(d)}\n" for p, d in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = out_dir / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info_ = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info_.external_attr = 0o644 << 16
            z.writestr(info_, data)
    return path
