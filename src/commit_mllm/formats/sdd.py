"""Song Describer Dataset (Manco et al., 2023): crowd-sourced captions of music tracks.

Published layout (``src`` is this folder or the CSV)::

    song_describer.csv     caption_id,track_id,caption,is_valid_subset,familiarity,
                           artist_id,album_id,path,duration,...
    audio/<NN>/<track_id>.2min.mp3      (``path`` is relative to audio/; NN = track_id % 100)

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
    check_media,
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


def _audio_path(row: dict[str, str], audio_dir: Path) -> Path:
    """The track's MP3: the ``path`` column, else ``<track_id % 100:02d>/<id>.2min.mp3``."""
    rel = row.get("path") or f"{int(row['track_id']) % 100:02d}/{row['track_id']}.2min.mp3"
    return audio_dir / rel


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
    audio_dir = find_dir(media_root or path.parent, ["audio", "audio/audio", ""], DATASET, "audio")
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
        audio = check_media(
            _audio_path(group[0], audio_dir), where, DATASET, "expected audio/<path column>"
        )
        clips.append((track_id, audio, [r["caption"] for r in group]))
        extra[track_id] = {"caption_ids": [r["caption_id"] for r in group]}
    return caption_rows(clips, name, "sdd", extra)
