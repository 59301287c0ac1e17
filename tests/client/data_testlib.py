"""Helpers of the install-engine data tests: releases with a migration, staged with schema
claims, and a device on 2.0 (schema 1) with a real database (issue 12, part 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import pytest
from fleetpush.client import schema
from fleetpush.client.data_settings import DataSettings
from fleetpush.client.install import apply_staged, mark_staged
from fleetpush.client.layout import StateLayout
from fleetpush.client.state import StagedInfo, load_state, save_state
from fleetpush.protocol import codec
from fleetpush.protocol.manifest import sign_manifest
from fp_data import MIGRATE_SRC, make_db
from fp_keys import RELEASE_KEY
from install_testlib import Files, manifest_for

DB = "data/app.db"


def release(version: str, migrate: str = "ok") -> Files:
    return {
        "app.py": (f"VERSION = {version!r}\n".encode(), 0o644),
        "migrate.py": (MIGRATE_SRC.encode(), 0o644),
        "migrate.txt": (migrate.encode() + b"\n", 0o644),
    }


def stage(
    state_dir: Path,
    version: str,
    sequence: int,
    files: Files,
    schema_version: int | None = None,
    min_schema: int | None = None,
) -> None:
    """updates/<version>/ as the downloader leaves it, with the schema claims given."""
    layout = StateLayout.of(state_dir)
    m = attrs.evolve(
        manifest_for(version, sequence, files),
        schema_version=schema_version,
        min_schema=min_schema,
    )
    signed = sign_manifest(m.to_bytes(), [RELEASE_KEY])
    layout.update_dir(version).mkdir(parents=True, exist_ok=True)
    layout.staged_manifest(version).write_bytes(codec.packb(codec.to_wire(signed)))
    for path, (data, _mode) in files.items():
        target = layout.staged_files(version) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    mark_staged(state_dir, version)
    state = load_state(state_dir)
    staged = StagedInfo(version=version, sequence=sequence)
    save_state(state_dir, attrs.evolve(state, staged=staged).raise_high_water(sequence))


SETTINGS = DataSettings(
    paths=(DB, "config.toml"),
    migrate_command=(sys.executable, "migrate.py"),
    migrate_timeout=30.0,
)


@pytest.fixture
def device(tmp_path: Path) -> tuple[Path, Path]:
    """2.0 (schema 1) installed, its data at schema 1, 3.0 staged."""
    state, root = tmp_path / "state", tmp_path / "root"
    stage(state, "2.0", 2, release("2.0"), schema_version=1)
    # A first install, no migrate_command: the app makes its data itself.
    apply_staged(state, root, "2.0", 100.0)
    assert record(state) == schema.SchemaRecord(schema=1, version="2.0")
    make_db(root / DB).close()
    (root / "config.toml").write_text("port = 8080\n")
    return state, root


def without_db(tree: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in tree.items() if k != DB}


def record(state: Path) -> schema.SchemaRecord:
    return schema.read_record(StateLayout.of(state))
