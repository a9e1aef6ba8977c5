"""The parts cache: where prepared parts live, their keys, content hashes and atomic publishing.

Every prepared part (the tiny self-pretrained parts and the real ones converted from PyPI
wheels) is a folder under :func:`default_cache_dir`. A folder is built under a temporary
name next to its final place and renamed into place when complete (atomic on one file
system), so a reader never sees a half-written folder and a killed preparation leaves only a
``.tmp-*`` folder that the next preparation removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_PREFIX",
    "building",
    "content_hash",
    "default_cache_dir",
    "digest",
    "library_versions",
    "publish",
    "remove_stale_temps",
    "resolve_cache_dir",
]

TMP_PREFIX = ".tmp-"
"""Prefix of folders under construction (never read; removed when stale)."""
STALE_S = 24 * 3600
"""A temporary folder older than this is taken for the leftover of a killed preparation."""


def default_cache_dir() -> Path:
    """``$COMMIT_MLLM_CACHE`` if set, else ``~/.cache/commit-mllm``."""
    env = os.environ.get("COMMIT_MLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "commit-mllm"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` (``~`` expanded) or :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code determines the prepared weights."""
    import torch
    import transformers

    from commit_mllm import __version__

    return {
        "commit_mllm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def digest(data: Any, n: int = 16) -> str:
    """First ``n`` hex digits of the SHA-256 of ``data`` as sorted-key JSON."""
    blob = json.dumps(data, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def content_hash(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over the tensors of every ``*.safetensors`` file and ``tokenizer/tokenizer.json``.

    Tensors are hashed by name, dtype, shape and bytes (not the file bytes), so the hash
    identifies the weights themselves.

    Args:
        folder: A prepared parts folder.

    Returns:
        Hex digest.
    """
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(str(path.relative_to(folder)).encode())
        tensors = load_file(str(path))
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    tok = folder / "tokenizer" / "tokenizer.json"
    if tok.is_file():
        h.update(tok.read_bytes())
    return h.hexdigest()


def remove_stale_temps(root: Path, older_than_s: float = STALE_S) -> list[Path]:
    """Removes ``.tmp-*`` folders in ``root`` left by killed preparations; returns them."""
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            try:
                if now - path.stat().st_mtime > older_than_s:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            except FileNotFoundError:  # another process removed it first
                continue
    return removed


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh temporary folder next to ``final``, removed on exit whatever happens.

    Publish it with :func:`publish` inside the ``with`` block; on an exception (or a kill)
    nothing is published and the temporary folder is removed (or, after a kill, left as a
    ``.tmp-*`` folder that :func:`remove_stale_temps` deletes later).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path, marker: str, replace: bool) -> None:
    """Renames the complete ``tmp`` folder to ``final`` (atomic on one file system).

    Args:
        tmp: The complete folder (its ``marker`` file written last).
        final: Where it goes.
        marker: The file whose presence makes a folder complete (manifest / report).
        replace: Replace a complete ``final`` (``--force``); otherwise a complete folder
            published meanwhile by another process is kept and ``tmp`` discarded.
    """
    if final.exists():
        if not replace and (final / marker).is_file():
            return  # another process finished the same folder first: keep its folder
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
