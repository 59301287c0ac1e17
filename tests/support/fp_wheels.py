"""Tiny real wheels written with zipfile (METADATA, WHEEL, RECORD), never downloaded.

pip and uv install them like any wheel from an index; the tests of Python
environments (issue 12) build every env from these, offline.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(
    out_dir: Path,
    name: str,
    version: str,
    *,
    files: Mapping[str, str] | None = None,
    requires: Sequence[str] = (),
) -> Path:
    """``out_dir/<name>-<version>-py3-none-any.whl`` holding ``files`` (default: a
    package ``<name>`` whose ``__version__`` is ``version``); ``requires`` become
    ``Requires-Dist`` lines. The bytes depend only on the arguments."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    files = files or {f"{dist}/__init__.py": f"__version__ = {version!r}\n"}
    info = f"{dist}-{version}.dist-info"
    meta = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
        + [f"Requires-Dist: {r}\n" for r in requires]
    )
    entries = {
        **files,
        f"{info}/METADATA": meta,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fp_wheels\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(
        f"{p},{_record_hash(c.encode())},{len(c.encode())}\n" for p, c in entries.items()
    )
    entries[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    path = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, c in entries.items():
            # A fixed date: the same wheel is the same bytes in every test run.
            z.writestr(zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0)), c)
    return path


def lock_line(wheel: Path) -> str:
    """``name==version --hash=sha256:<hex>`` for ``wheel`` (pip's --require-hashes form)."""
    name, version = wheel.name.split("-")[:2]
    return f"{name}=={version} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}\n"
