r"""Read and validate LLaVA-style conversation data (JSON list, JSONL or ``datasets.Dataset``).

Each row looks like::

    {"id": "0", "image": "imgs/0.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                       {"from": "gpt", "value": "red"}]}

``image`` / ``audio`` are paths relative to ``media_root`` (LLaVA's ``image_folder``);
``sampling_rate`` and ``question_type`` are optional. Rows are validated when the file is
read and every problem is reported as one line naming the file and row, e.g.
``data.jsonl line 7: missing field 'conversations'``. Media are loaded lazily (paths are
kept) unless ``load_media=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from commit_mllm.data.media import load_audio, load_image
from commit_mllm.data.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN

ROLES = ("human", "gpt")
"""Accepted values of a turn's ``from`` field."""


class DataFormatError(ValueError):
    """A data file or row is malformed; the message names the file and the row."""


def _check_turns(turns: Any, where: str) -> None:
    """Validate the ``conversations`` list: dict turns alternating human / gpt."""
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list of turns")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataFormatError(f"{where}: turn {k} must be an object with 'from' and 'value'")
        role = turn["from"]
        if role not in ROLES:
            raise DataFormatError(
                f"{where}: turn {k} has unknown role {role!r} (expected 'human' or 'gpt')"
            )
        if role != ROLES[k % 2]:
            raise DataFormatError(
                f"{where}: turn {k} is {role!r} but turns must alternate human, gpt, ..."
            )
        if not isinstance(turn["value"], str):
            raise DataFormatError(f"{where}: turn {k} 'value' must be a string")
        if role == "gpt" and not turn["value"].strip():
            raise DataFormatError(f"{where}: turn {k} is an empty answer (nothing to supervise)")
    if turns[-1]["from"] != "gpt":
        raise DataFormatError(f"{where}: the last turn must be a 'gpt' answer")


def _check_placeholders(row: dict, where: str) -> None:
    """One placeholder per present modality, in the first human turn; none otherwise."""
    turns = row["conversations"]
    for key, token in (("image", IMAGE_TOKEN), ("audio", AUDIO_TOKEN)):
        total = sum(t["value"].count(token) for t in turns)
        if row.get(key) is None:
            if total:
                raise DataFormatError(f"{where}: has placeholder '{token}' but no '{key}' field")
            continue
        if total == 0:
            raise DataFormatError(f"{where}: has '{key}' but the first human turn lacks '{token}'")
        if total != 1 or turns[0]["value"].count(token) != 1:
            raise DataFormatError(
                f"{where}: '{token}' must appear exactly once, in the first human turn"
            )


def _resolve_media(row: dict, key: str, media_root: Path | None, where: str, check: bool) -> Any:
    """Turn a relative media path into an absolute one; check the file exists."""
    value = row.get(key)
    if not isinstance(value, str | os.PathLike):
        return value  # None, PIL image, numpy array or a datasets Audio dict
    path = Path(value)
    if not path.is_absolute() and media_root is not None:
        path = media_root / path
    if check and not path.is_file():
        raise DataFormatError(f"{where}: {key} file '{value}' not found (looked at '{path}')")
    return str(path)


def validate_row(
    row: Any, where: str, media_root: Path | None = None, check_files: bool = True
) -> dict[str, Any]:
    """Validate one row and normalise it to a sample dict.

    Args:
        row: The parsed row.
        where: Location used in error messages, e.g. ``"data.jsonl line 7"``.
        media_root: Folder that relative ``image`` / ``audio`` paths are relative to.
        check_files: Check that media files exist.

    Returns:
        A sample: ``id``, ``image``, ``audio``, ``sampling_rate``, ``conversations``,
        ``question_type`` (absent optional fields are ``None``; a missing id becomes the row
        location).

    Raises:
        DataFormatError: With a one-line message starting with ``where``.
    """
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "conversations" not in row:
        raise DataFormatError(f"{where}: missing field 'conversations'")
    _check_turns(row["conversations"], where)
    _check_placeholders(row, where)
    return {
        "id": str(row["id"]) if row.get("id") is not None else where,
        "image": _resolve_media(row, "image", media_root, where, check_files),
        "audio": _resolve_media(row, "audio", media_root, where, check_files),
        "sampling_rate": row.get("sampling_rate"),
        "conversations": [{"from": t["from"], "value": t["value"]} for t in row["conversations"]],
        "question_type": row.get("question_type"),
    }


def read_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """Yield ``(location, parsed row)`` from a JSON list or a JSONL file, unvalidated.

    A ``.jsonl`` file is read line by line, anything else as one JSON list; the location
    (``"data.jsonl line 7"``, ``"data.json row 3"``) is what error messages name.

    Raises:
        DataFormatError: Invalid JSON, or a JSON file whose top level is not a list.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path.name} line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{path.name} line {lineno}: invalid JSON at column {exc.colno}: {exc.msg}"
                ) from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            f"{path.name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path.name}: top level must be a JSON list of rows")
    for index, row in enumerate(data):
        yield f"{path.name} row {index}", row


class LlavaDataset(Dataset):
    """Validated LLaVA-style samples (a ``torch.utils.data.Dataset``).

    Args:
        samples: Validated sample dicts (see :func:`validate_row`).
        load_media: If true, ``__getitem__`` returns loaded media (RGB PIL image, float32
            16 kHz mono array) instead of paths.
    """

    def __init__(self, samples: Sequence[dict[str, Any]], load_media: bool = False) -> None:
        self.samples = list(samples)
        self.load_media = load_media

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index`` (a shallow copy, media loaded if ``load_media``)."""
        sample = dict(self.samples[index])
        if self.load_media:
            if sample["image"] is not None:
                sample["image"] = load_image(sample["image"])
            if sample["audio"] is not None:
                sample["audio"] = load_audio(sample["audio"], sample["sampling_rate"])
                sample["sampling_rate"] = 16_000
        return sample


def load_llava(
    source: str | os.PathLike | Any,
    media_root: str | os.PathLike | None = None,
    image_folder: str | os.PathLike | None = None,
    check_files: bool = True,
    load_media: bool = False,
) -> LlavaDataset:
    """Load LLaVA-style data from a ``.json`` / ``.jsonl`` file, a ``datasets.Dataset`` or a list.

    Args:
        source: Path to a JSON list or JSONL file, a Hugging Face ``datasets.Dataset`` (or
            any sequence of row dicts) with the same columns.
        media_root: Folder for relative ``image`` / ``audio`` paths. Defaults to
            ``image_folder``, else the data file's folder.
        image_folder: LLaVA's name for ``media_root``.
        check_files: Check that every referenced media file exists.
        load_media: Load media in ``__getitem__`` rather than returning paths.

    Returns:
        A :class:`LlavaDataset`.

    Raises:
        DataFormatError: On the first malformed row, naming the file and the row.
        FileNotFoundError: If ``source`` is a path that does not exist.
    """
    root = media_root if media_root is not None else image_folder
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: '{path}'")
        root_path = Path(root) if root is not None else path.parent
        rows: Iterable[tuple[str, Any]] = read_rows(path)
    else:
        root_path = Path(root) if root is not None else None
        rows = ((f"dataset row {i}", dict(row)) for i, row in enumerate(source))
    samples = [validate_row(row, where, root_path, check_files) for where, row in rows]
    return LlavaDataset(samples, load_media=load_media)


def save_llava_json(samples: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write samples (with path or ``None`` media) as a LLaVA JSON list or JSONL file.

    Args:
        samples: Sample dicts; ``image`` / ``audio`` must be paths (strings) or ``None``.
        path: Output file; ``.jsonl`` writes one row per line, anything else a JSON list.
    """
    keys = ("id", "image", "audio", "sampling_rate", "conversations", "question_type")
    rows = [{k: s[k] for k in keys if s.get(k) is not None} for s in samples]
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
