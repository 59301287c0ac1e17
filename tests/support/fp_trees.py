"""Release source trees written into a directory before publishing them.

One copy of what the client, server and hostile suites used to write each
their own way: small trees of given bytes, big trees of incompressible bytes,
the test apps of tests/apps, and the digests to compare a staged tree with.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

APPS = Path(__file__).resolve().parent.parent / "apps"


def noise(seed: bytes, size: int) -> Iterator[bytes]:
    """``size`` bytes that never repeat: SHA-256(seed || counter) blocks, about 1 MiB at a time.

    Distinct seeds give distinct chunks, so no chunk of a release is reused
    from another version or file unless a test asks for that.
    """
    counter = 0
    left = size
    while left:
        n = min(left, 1 << 20)
        count = -(-n // 32)
        piece = b"".join(
            hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
            for i in range(counter, counter + count)
        )
        counter += count
        yield piece[:n]
        left -= n


def write_noise(path: Path, size: int, seed: bytes) -> Path:
    """Write ``size`` bytes of :func:`noise` to ``path``."""
    with open(path, "wb") as f:
        for piece in noise(seed, size):
            f.write(piece)
    return path


def make_tree(root: Path, files: Mapping[str, bytes | int], seed: int = 0) -> Path:
    """Write ``files`` under ``root``; an int value means that many cheap pseudo-random bytes.

    The int form repeats an 8-byte pattern (the seed and the MiB's index)
    within each MiB: fast for big files, but its chunks repeat. Use
    :func:`noise` or :func:`make_release_dir` where every chunk must differ.
    """
    root.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(p, "wb") as f:
                left = content
                block = 0
                while left:
                    n = min(left, 1 << 20)
                    f.write(
                        (seed.to_bytes(4, "big") + block.to_bytes(4, "big")) * (n // 8)
                        + b"x" * (n % 8)
                    )
                    left -= n
                    block += 1
        else:
            p.write_bytes(content)
    return root


def release_tree(
    tmp: Path, app: str, version: str, files: Mapping[str, bytes | int] | None = None
) -> Path:
    """``tmp/src-<app>-<version>`` holding ``files`` (default: one small ``app.txt``)."""
    return make_tree(
        tmp / f"src-{app}-{version}", files or {"app.txt": f"{app} {version}".encode()}
    )


def make_release_dir(root: Path, size: int, *, files: int = 2, seed: int = 0) -> Path:
    """``files`` files ``part<i>.bin`` of :func:`noise` totalling ``size`` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    per = size // files
    for i in range(files):
        n = per if i < files - 1 else size - per * (files - 1)
        write_noise(root / f"part{i}.bin", n, hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return root


def app_release(tmp: Path, kind: str, version: str, behavior: str = "ok") -> Path:
    """A release directory of test app ``kind`` (tests/apps: embedded_app / plain_app).

    The app answers ``version`` and behaves as ``behavior.txt`` says (ok,
    noconfirm, crash...; see the app's own docstring).
    """
    src = tmp / f"rel-{kind}-{version}-{behavior}"
    src.mkdir(parents=True)
    shutil.copy(APPS / kind / "app.py", src / "app.py")
    (src / "version.txt").write_text(version + "\n")
    (src / "behavior.txt").write_text(behavior + "\n")
    return src


def tree_digests(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 hex of every file under ``root`` (``__pycache__`` left out)."""
    out = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        out[p.relative_to(root).as_posix()] = h.hexdigest()
    return out
