"""MACS (Martín-Morató & Mesaros, 2021): multi-annotator captions of urban sound scenes.

Published layout (``src`` is the folder of ``MACS.yaml`` or the file; ``media_root`` is
the TAU Urban Acoustic Scenes 2019 development folder, default ``src``)::

    MACS.yaml        files: [{filename: airport-lisbon-1000-40000-a.wav,
                              annotations: [{annotator_id, sentence, tags}, ...]}, ...]
    <tau>/audio/<filename>                       (TAU-urban-acoustic-scenes-2019-development)
    <tau>/evaluation_setup/fold1_evaluate.csv    (optional: the official test fold)

MACS has no split of its own. ``test`` is the clips listed in TAU's ``fold1_evaluate.csv``
when that file exists, else a deterministic 10% of clips by an MD5 hash of the file name;
``train`` is the rest; ``all`` is every clip. ``train`` yields one row per caption; ``test``
and ``all`` one row per clip with every caption in ``meta["references"]``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from commit_mllm.formats import (
    FormatError,
    check_media,
    check_split,
    find_dir,
    hash_split,
    make_row,
    require,
)

__all__ = ["CAPTION_PROMPT", "SPLITS", "caption_rows", "read"]

SPLITS = ("train", "test", "all")
DATASET = "MACS"
CAPTION_PROMPT = "Describe the audio in one sentence."
EXPECTED = "MACS.yaml with 'files: [{filename, annotations: [{annotator_id, sentence}]}]'"


def caption_rows(
    clips: list[tuple[str, Path, list[str]]], split: str, fmt: str, extra: dict[str, dict]
) -> list[dict[str, Any]]:
    """Rows of a captioning split: one per caption for ``train``, one per clip otherwise.

    Args:
        clips: ``(clip id, audio path, captions)``.
        split: ``train`` (per caption) or an evaluation split (per clip).
        fmt: Format name stored in ``meta``.
        extra: Additional ``meta`` fields per clip id.
    """
    out = []
    for clip_id, audio, captions in clips:
        meta = {"format": fmt, "references": captions, **extra.get(clip_id, {})}
        if split == "train":
            for k, caption in enumerate(captions):
                rid = f"{clip_id}#{k}"
                out.append(make_row(rid, "audio", audio, CAPTION_PROMPT, caption, "caption", meta))
        else:
            first = captions[0]
            out.append(make_row(clip_id, "audio", audio, CAPTION_PROMPT, first, "caption", meta))
    return out


def _load_yaml(path: Path) -> list[Any]:
    if not path.is_file():
        raise FormatError(f"{DATASET}: annotation file '{path}' not found; expected {EXPECTED}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except yaml.YAMLError as exc:
        raise FormatError(f"{DATASET}: '{path.name}' is not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise FormatError(f"{DATASET}: '{path.name}' must be {EXPECTED}")
    return data["files"]


def _test_files(tau: Path) -> set[str] | None:
    """File names of TAU's fold1 evaluation list, or None when it is not there."""
    path = tau / "evaluation_setup" / "fold1_evaluate.csv"
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        return {Path(r[0]).name for r in csv.reader(f, delimiter="\t") if r and r[0] != "filename"}


def read(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read one split of MACS.

    Args:
        src: Folder with ``MACS.yaml`` (or that file).
        split: ``train``, ``test`` or ``all``.
        media_root: TAU Urban Acoustic Scenes 2019 development folder (default: ``src``).

    Returns:
        Rows with ``meta = {"format", "references", "annotator_ids"}``.
    """
    check_split(split, SPLITS, DATASET)
    path = src if src.is_file() else src / "MACS.yaml"
    files = _load_yaml(path)
    audio_dir = find_dir(
        media_root or path.parent,
        ["audio", "TAU-urban-acoustic-scenes-2019-development/audio", ""],
        DATASET,
        "TAU Urban Acoustic Scenes 2019 audio",
    )
    test_files = _test_files(audio_dir.parent)
    clips, extra = [], {}
    for index, entry in enumerate(files):
        where = f"{path.name} files[{index}]"
        require(entry, ("filename", "annotations"), where, "a MACS file entry")
        name = str(entry["filename"])
        in_test = name in test_files if test_files is not None else hash_split(name) == "test"
        if split != "all" and in_test != (split == "test"):
            continue
        captions, annotators = [], []
        for k, ann in enumerate(entry["annotations"] or []):
            require(ann, ("sentence",), f"{where} annotations[{k}]", "a MACS annotation")
            captions.append(str(ann["sentence"]).strip())
            annotators.append(ann.get("annotator_id"))
        if not captions:
            raise FormatError(f"{where}: no annotations with a 'sentence'")
        audio = check_media(audio_dir / name, where, DATASET, "expected <tau>/audio/<filename>")
        clips.append((name, audio, captions))
        extra[name] = {"annotator_ids": annotators}
    return caption_rows(clips, split, "macs", extra)
