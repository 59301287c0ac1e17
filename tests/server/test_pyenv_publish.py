"""Publishing a release with its Python environment (issue 12, part 1).

pip really resolves and downloads, always from a wheelhouse of wheels the test
writes (fp_wheels), never from the network: ``--requirements`` alone is run
with pip pointed at that wheelhouse through its own environment variables.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from fleetpush.protocol.manifest import Manifest, PythonEnv
from fleetpush.server import publish_release
from fleetpush.server.errors import PublishError
from fleetpush.server.pyenv_publish import LOCK, WHEELS, resolve_env
from fleetpush.server.releases import ReleaseStore
from fp_keys import RELEASE_KEY
from fp_wheels import make_wheel

FLEETPUSH = str(Path(sys.executable).with_name("fleetpush"))


def run_fleetpush(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLEETPUSH, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    wh = tmp_path / "wheelhouse"
    make_wheel(wh, "alpha", "1.0")
    make_wheel(wh, "beta", "2.0", requires=["alpha"])
    make_wheel(wh, "gamma-lib", "0.3")
    return wh


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def app_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "app.py").write_text("import beta\n")
    return src


def test_requirements_are_resolved_by_pip_with_their_dependencies(
    tmp_path: Path, wheelhouse: Path
) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("beta\n")
    env = resolve_env(tmp_path / "work", requirements=req, wheelhouse=wheelhouse, imports=["beta"])
    assert env.python == PythonEnv(
        lock=LOCK, wheels=WHEELS, imports=["beta"], python="{}.{}".format(*sys.version_info)
    )
    assert [rel for rel, _ in env.files] == [
        LOCK, f"{WHEELS}/alpha-1.0-py3-none-any.whl", f"{WHEELS}/beta-2.0-py3-none-any.whl",
    ]
    lock = (tmp_path / "work" / "requirements.lock").read_text().splitlines()[1:]
    assert lock == [
        f"alpha==1.0 --hash=sha256:{sha(wheelhouse / 'alpha-1.0-py3-none-any.whl')}",
        f"beta==2.0 --hash=sha256:{sha(wheelhouse / 'beta-2.0-py3-none-any.whl')}",
    ]


def test_requirements_alone_use_pips_own_index_settings(
    tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The publisher's pip configuration decides where wheels come from; here
    # it says "this directory, no index" so the test stays offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    req = tmp_path / "requirements.txt"
    req.write_text("gamma_lib==0.3\n")
    env = resolve_env(tmp_path / "work", requirements=req)
    assert [rel for rel, _ in env.files][1:] == [f"{WHEELS}/gamma_lib-0.3-py3-none-any.whl"]


def test_a_wheel_missing_from_the_wheelhouse_is_one_sentence(
    tmp_path: Path, wheelhouse: Path
) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("beta\ndelta==1.0\n")
    with pytest.raises(PublishError) as e:
        resolve_env(tmp_path / "work", requirements=req, wheelhouse=wheelhouse)
    assert str(e.value) == (
        f"pip could not get the wheels from {wheelhouse}: "
        "ERROR: No matching distribution found for delta==1.0"
    )


def test_a_hash_pinned_lock_is_checked_by_pip(tmp_path: Path, wheelhouse: Path) -> None:
    req = tmp_path / "requirements.lock"
    req.write_text("alpha==1.0 --hash=sha256:" + "0" * 64 + "\n")
    mismatch = r"^pip could not get the wheels from .*: ERROR: THESE PACKAGES DO NOT MATCH"
    with pytest.raises(PublishError, match=mismatch):
        resolve_env(tmp_path / "work", requirements=req, wheelhouse=wheelhouse)


def test_a_wheelhouse_alone_ships_every_wheel_and_publishes_them_signed(
    tmp_path: Path, wheelhouse: Path
) -> None:
    env = resolve_env(tmp_path / "work", wheelhouse=wheelhouse, imports=["alpha", "gamma_lib"])
    data = tmp_path / "data"
    publish_release(
        data, app_dir(tmp_path), app="demo", version="1.0", signing_keys=[RELEASE_KEY], env=env
    )
    store = ReleaseStore.open(data)
    try:
        rec = store.get("demo", "1.0")
    finally:
        store.close()
    m = Manifest.from_bytes(rec.signed.signed)
    assert m.python is not None and m.python.imports == ["alpha", "gamma_lib"]
    paths = [f.path for f in m.files]
    assert paths == sorted([
        "app.py", LOCK, *(f"{WHEELS}/{w.name}" for w in sorted(wheelhouse.iterdir())),
    ])
    for w in wheelhouse.iterdir():
        assert (rec.dir / WHEELS / w.name).read_bytes() == w.read_bytes()
        assert m.file(f"{WHEELS}/{w.name}").digest.hex() == sha(w)  # type: ignore[union-attr]


def test_the_reserved_prefix_cannot_come_from_the_release_directory(
    tmp_path: Path, wheelhouse: Path
) -> None:
    src = app_dir(tmp_path)
    (src / ".fleetpush" / "python").mkdir(parents=True)
    (src / ".fleetpush" / "python" / "requirements.lock").write_text("mine\n")
    env = resolve_env(tmp_path / "work", wheelhouse=wheelhouse)
    with pytest.raises(PublishError, match="is reserved for the environment"):
        publish_release(tmp_path / "d", src, app="demo", version="1.0",
                        signing_keys=[RELEASE_KEY], env=env)


def test_cli_publish_with_a_wheelhouse_and_its_failure_line(
    tmp_path: Path, wheelhouse: Path
) -> None:
    key = tmp_path / "release.key"
    assert run_fleetpush("keygen", "--out", str(key)).returncode == 0
    data = tmp_path / "data"
    src = app_dir(tmp_path)
    req = tmp_path / "requirements.txt"
    req.write_text("beta\n")
    base = ["release", "publish", str(src), "--app", "demo", "--key", str(key),
            "--data-dir", str(data), "--wheelhouse", str(wheelhouse), "--requirements", str(req)]
    ok = run_fleetpush(*base, "--version", "1.0", "--import", "beta", "--json")
    assert ok.returncode == 0, ok.stderr
    req.write_text("beta\nnowhere\n")
    bad = run_fleetpush(*base, "--version", "1.1")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [
        f"fleetpush: release publish: pip could not get the wheels from {wheelhouse}: "
        "ERROR: No matching distribution found for nowhere"
    ]
