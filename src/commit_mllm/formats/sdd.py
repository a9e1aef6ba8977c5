"""Song Describer Dataset (Manco et al., 2023): crowd-sourced captions of music tracks.

Published layout (Zenodo record 10072001; ``src`` is this folder or the CSV)::

    song_describer.csv     caption_id,track_id,caption,is_valid_subset,familiarity,
                           artist_id,album_id,path,duration,...
    audio/<NN>/<track_id>.2min.mp3      (NN = track_id % 100; some unzip to audio/audio/)

The CSV's ``path`` column is MTG-Jamendo's path of the full track (``<NN>/<track_id>.mp3``)
while the archive holds 2-minute excerpts named ``<track_id>.2min.mp3``: the reader looks
for the ``path`` as written, then its ``.2min.mp3`` excerpt, then
``<NN>/<track_id>.2min.mp3``.

SDD ships a single evaluation split. ``test`` is a deterministic 10% of tracks (MD5 hash of
the track id), ``train`` the rest, ``all`` every track; ``<split>/valid`` keeps only
captions with ``is_valid_subset`` true. ``train`` yields one row per caption, ``test`` and
``all`` one row per track with every caption in ``meta["references"]``. The audio is MP3:
reading it needs libsndfile >= 1.1 (soundfile >= 0.12 wheels ship it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from commit_mllm.formats import (
    FormatError,
    check_split,
    find_dir,
    hash_split,
    read_csv,
)
from commit_mllm.formats.macs import caption_rows

__all__ = ["COLUMNS", "SPLITS", "read"]

SPLITS = ("train", "test", "all")
DATASET = "SongDescriber"
COLUMNS = ("caption_id", "track_id", "caption")


def _read_csv(path: Path) -> list[dict[str, str]]:
    return read_csv(
        path,
        DATASET,
        COLUMNS,
        "song_describer.csv with columns caption_id,track_id,caption,is_valid_subset,...,path",
    )


def _audio_path(row: dict[str, str], audio_dirs: list[Path], where: str) -> Path:
    """The track's audio file (see the module docstring for the names tried).

    Raises:
        FormatError: None of the names exists; the message lists them.
    """
    track = row["track_id"]
    names = []
    rel = row.get("path")
    if rel:
        names.append(rel)
        stem, dot, ext = rel.rpartition(".")
        if dot and not stem.endswith(".2min"):
            names.append(f"{stem}.2min.{ext}")  # the archive's excerpt
    names.append(f"{int(track) % 100:02d}/{track}.2min.mp3")
    tried = [folder / name for folder in audio_dirs for name in names]
    for path in tried:
        if path.is_file():
            return path
    looked = ", ".join(f"'{p}'" for p in dict.fromkeys(tried))
    raise FormatError(
        f"{where}: {DATASET} media file not found (looked at {looked}; expected "
        "audio/<NN>/<track_id>.2min.mp3 as in the published archive)"
    )


def read(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read one split of the Song Describer Dataset.

    Args:
        src: Folder with ``song_describer.csv`` (or that file).
        split: ``train``, ``test`` or ``all``, optionally with ``/valid``.
        media_root: Folder containing ``audio/`` (default: the CSV's folder).

    Returns:
        Rows with ``meta = {"format", "references", "caption_ids"}``.
    """
    name, _, subset = split.partition("/")
    check_split(name, SPLITS, DATASET)
    if subset not in ("", "valid"):
        raise FormatError(f"{DATASET}: unknown subset {subset!r} (use <split>/valid)")
    path = src if src.is_file() else src / "song_describer.csv"
    rows = _read_csv(path)
    base = media_root or path.parent
    find_dir(base, ["audio", "audio/audio", ""], DATASET, "audio")  # names the places if none
    audio_dirs = [d for d in (base / "audio" / "audio", base / "audio", base) if d.is_dir()]
    tracks: dict[str, list[dict[str, str]]] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row["track_id"].isdigit() or not row["caption"]:
            raise FormatError(f"{path.name} line {lineno}: needs a numeric track_id and a caption")
        if subset == "valid" and row.get("is_valid_subset", "").lower() not in ("true", "1"):
            continue
        if name == "all" or hash_split(row["track_id"]) == name:
            tracks.setdefault(row["track_id"], []).append(row)
    clips, extra = [], {}
    for track_id, group in tracks.items():
        where = f"{path.name} track {track_id}"
        audio = _audio_path(group[0], audio_dirs, where)
        clips.append((track_id, audio, [r["caption"] for r in group]))
        extra[track_id] = {"caption_ids": [r["caption_id"] for r in group]}
    return caption_rows(clips, name, "sdd", extra)
