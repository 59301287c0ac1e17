"""The manifest fields added after format 1 (PROTOCOL.md §7.3, §7.3.1, §7.3.2)."""

from __future__ import annotations

import pytest
from fleetpush.protocol import codec
from fleetpush.protocol.errors import ManifestError
from fleetpush.protocol.manifest import FileEntry, Manifest, PythonEnv

D = b"\x01" * 32


def _files(*paths: str) -> list[FileEntry]:
    return [FileEntry(path=p, size=1, mode=0o644, digest=D, chunks=[D]) for p in paths]


def _manifest(**kw: object) -> Manifest:
    base: dict[str, object] = dict(
        app="a", version="1.0", sequence=1, created=1, chunk_size=65536,
        files=_files("app.py", "env/wheels/x-1-py3-none-any.whl", "env/lock.txt"),
    )
    return Manifest(**{**base, **kw})  # type: ignore[arg-type]


def test_unset_optional_fields_are_absent_so_old_bytes_stay_the_same() -> None:
    raw = codec.unpackb(_manifest().to_bytes())
    assert not {"python", "schema_version", "min_schema"} & set(raw)


def test_optional_fields_round_trip_to_the_same_bytes() -> None:
    m = _manifest(
        python=PythonEnv(lock="env/lock.txt", wheels="env/wheels", imports=["x", "x.y"]),
        schema_version=4,
        min_schema=2,
    )
    data = m.to_bytes()
    assert Manifest.from_bytes(data) == m
    assert Manifest.from_bytes(data).to_bytes() == data


def test_an_explicit_nil_reads_as_absent() -> None:
    raw = codec.unpackb(_manifest().to_bytes())
    raw["schema_version"] = None
    assert Manifest.from_bytes(codec.packb(raw)).schema_version is None


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"min_schema": 1}, "min_schema needs schema_version"),
        ({"schema_version": 2, "min_schema": 3}, "min_schema 3 is above schema_version 2"),
        ({"schema_version": -1}, "schema_version -1 outside"),
        ({"python": PythonEnv(lock="nope.txt", wheels="env/wheels")}, "python.lock"),
        ({"python": PythonEnv(lock="env/lock.txt", wheels="wheels")}, "python.wheels"),
        (
            {"python": PythonEnv(lock="env/lock.txt", wheels="env/wheels", imports=["a b"])},
            "python.imports",
        ),
    ],
)
def test_bad_optional_fields_are_refused(kw: dict[str, object], words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        _manifest(**kw).to_bytes()
