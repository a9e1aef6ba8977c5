"""Convert the paper's datasets, and evaluate a checkpoint on any run's data.

The functions here take plain arguments (no argparse) so the CLI can wrap them::

    commit-mllm convert --format textvqa /data/textvqa data/paper/textvqa_val.jsonl --split val
    commit-mllm eval --config my_run.yaml --checkpoint runs/x --eval-file data/val.json

:func:`run_eval` builds the run's model from its config, loads the trainable weights of a
checkpoint, greedily generates an answer for every question of the evaluation set and
scores it:

- a LLaVA-style JSON list or JSONL file (what ``train`` reads): exact match after
  normalization, overall and per ``question_type``;
- rows that name a paper dataset in ``meta.format`` (files written by ``commit-mllm
  convert``, or a dataset folder read with ``data.format``): that dataset's metric from
  :func:`commit_mllm.evaluation.metrics.score_details`, plus exact match;
- no evaluation file and a built-in ``data.task``: the task's test split, exact match per
  question type.

It writes per-question predictions and the summary to the output folder and prints a table.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "format_table",
    "load_trainable",
    "read_converted",
    "read_eval_rows",
    "resolve_checkpoint",
    "run_convert",
    "run_eval",
]


def run_convert(
    format_name: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train",
    media_root: str | os.PathLike | None = None,
    relative_to: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Convert one split of a paper dataset to LLaVA-style JSONL (``commit-mllm convert``).

    Args:
        format_name: ``textvqa``, ``iconqa``, ``aokvqa``, ``aokvqa-da``, ``clothoaqa``,
            ``macs`` or ``sdd``.
        src: The dataset's annotation folder (or main annotation file).
        out: Output ``.jsonl`` path.
        split: Split to convert.
        media_root: Folder of the media when not under ``src`` (COCO, TAU 2019).
        relative_to: Write media paths relative to this folder (default: absolute).
        log: Where the one-line report goes.

    Returns:
        The number of rows written.
    """
    from ..formats import convert

    n = convert(format_name, src, out, split=split, media_root=media_root, relative_to=relative_to)
    log(f"{format_name} {split}: wrote {n} rows to {out}")
    return n


def read_eval_rows(
    path: str | os.PathLike,
    data_format: str | None = None,
    split: str = "val",
    media_root: str | os.PathLike | None = None,
) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """Rows of an evaluation set and the paper dataset they name, if any.

    Args:
        path: A LLaVA-style JSON list (``.json``) or JSONL (``.jsonl``) file, or with
            ``data_format`` a dataset in its published layout (folder or annotation file).
        data_format: ``data.format`` of the run (read ``path`` with that reader).
        split: Split read with ``data_format``.
        media_root: Media folder for ``data_format``.

    Returns:
        ``(format_name, [(location, row), ...])``; the format is None when no row names one
        (plain rows: exact match only).

    Raises:
        FileNotFoundError: No such file.
        DataFormatError: Not a JSON list / JSONL file, invalid JSON, no rows, rows that mix a
            named format with plain rows or name several formats, or an unknown format.
    """
    from ..data import DataFormatError, read_rows
    from ..formats import FORMATS

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"evaluation file not found: '{path}'")
    if data_format is not None and (path.is_dir() or path.suffix.lower() not in _SUFFIXES):
        from ..formats import read_format

        rows = read_format(data_format, path, split, media_root)
        return data_format, [(f"{data_format} row {i}", r) for i, r in enumerate(rows)]
    if path.is_dir() or path.suffix.lower() not in _SUFFIXES:
        raise DataFormatError(
            f"'{path}': expected a LLaVA-style JSON list (.json) or JSONL (.jsonl) file, as "
            "'train' reads (a paper dataset's folder needs data.format, or convert it first "
            "with 'commit-mllm convert')"
        )
    rows = list(read_rows(path))
    if not rows:
        raise DataFormatError(f"{path.name}: no rows")
    named = {}
    for where, row in rows:
        meta = row.get("meta") if isinstance(row, dict) else None
        named[where] = meta.get("format") if isinstance(meta, dict) else None
    formats = sorted({f for f in named.values() if f is not None})
    if not formats:
        return None, rows
    plain = [w for w, f in named.items() if f is None]
    if plain:
        raise DataFormatError(
            f"{plain[0]}: no 'meta.format' while other rows name {formats[0]!r}; score one "
            "kind of file at a time (converted rows, or plain rows for exact match)"
        )
    if len(formats) > 1:
        raise DataFormatError(f"{path.name}: rows of several formats {formats}")
    if formats[0] not in FORMATS:
        where = next(w for w, f in named.items() if f == formats[0])
        raise DataFormatError(
            f"{where}: meta.format {formats[0]!r} is not a known dataset ({', '.join(FORMATS)}); "
            "remove it to score by exact match"
        )
    return formats[0], rows


_SUFFIXES = (".json", ".jsonl")


def read_converted(path: str | os.PathLike) -> tuple[str, list[dict[str, Any]]]:
    """Read a converted file (rows naming ``meta.format``) and the dataset format they carry.

    Args:
        path: A file written by :func:`run_convert`.

    Returns:
        ``(format_name, rows)``.

    Raises:
        FileNotFoundError: No such file.
        DataFormatError: A row without ``meta.format`` (not a converted file), mixed formats,
            or an empty file.
    """
    from ..data import DataFormatError

    fmt, rows = read_eval_rows(path)
    if fmt is None:
        raise DataFormatError(
            f"{rows[0][0]}: no 'meta.format'; paper evaluation needs a file written by "
            "'commit-mllm convert'"
        )
    return fmt, [row for _, row in rows]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder to load: ``path`` itself or the newest complete one in a run.

    Args:
        path: A checkpoint folder (with ``trainable.safetensors``) or a run folder.

    Raises:
        FileNotFoundError: Neither.
    """
    from .checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "trainable.safetensors").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint at '{path}' (expected a folder with trainable.safetensors, or a run "
            "folder with checkpoints/step-*)"
        )
    return found


def load_trainable(model: torch.nn.Module, checkpoint: str | os.PathLike) -> Path:
    """Load a checkpoint's trainable weights into ``model`` by name (no optimizer needed).

    Args:
        model: The model built from the same config as the training run.
        checkpoint: A checkpoint folder or a run folder (newest checkpoint).

    Returns:
        The checkpoint folder loaded.

    Raises:
        ValueError: The checkpoint's tensors do not match the model's trainable parameters.
    """
    from .checkpoint import load_trainable as load_weights

    folder = resolve_checkpoint(checkpoint)
    load_weights(model, folder)
    return folder


def format_table(title: str, summary: dict[str, float]) -> str:
    """A two-column text table of metric values (fractions shown x100 except CIDEr and n)."""
    lines = [title, f"{'metric':<28} {'value':>10}", "-" * 39]
    for key, value in summary.items():
        if key == "n" or key.startswith("n_"):
            shown = f"{int(value)}"
        elif key == "cider":
            shown = f"{value:.4f}"
        else:
            shown = f"{100 * value:.2f}"
        lines.append(f"{key:<28} {shown:>10}")
    return "\n".join(lines)


def _autocast(precision: str, device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda" or precision == "no":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def run_eval(
    config_path: str | os.PathLike,
    checkpoint_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | os.PathLike | None = None,
    eval_file: str | os.PathLike | None = None,
    max_samples: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Evaluate a checkpoint on the run's evaluation data (``commit-mllm eval``).

    Args:
        config_path: The run's YAML config (model, tokenizer, data, generation settings).
        checkpoint_dir: A checkpoint folder or a run folder (newest checkpoint). ``None``:
            the newest checkpoint of ``run.output_dir``, or the model as built (zero-shot)
            when the run has none.
        overrides: ``key=value`` config overrides.
        out_dir: Where predictions and the summary go (default
            ``<run.output_dir>/eval``).
        eval_file: LLaVA-style JSON / JSONL file, or a dataset folder with ``data.format``
            (default ``data.eval_file``; without one, a built-in task's test split).
        max_samples: Evaluate only the first N samples (default: all of a file; a built-in
            task's ``data.max_eval_samples``).
        log: Where progress lines and the table go.

    Returns:
        The metric summary (also in ``<out_dir>/eval_<name>.json``): ``accuracy`` (exact
        match) and ``accuracy/<question_type>`` for plain rows; the dataset's metrics plus
        ``exact_match`` for rows naming a paper dataset; ``n``.

    Raises:
        ValueError: No evaluation data, a file that is not LLaVA-style JSON / JSONL, or a
            checkpoint that does not match the model.
    """
    from ..evaluation.generate import evaluate
    from ..evaluation.metrics import score_details
    from .assembly import assemble
    from .config import load_config

    cfg = load_config(config_path, overrides)
    name, fmt, samples, rows, source = _eval_set(cfg, eval_file, max_samples)
    built = assemble(cfg, log=log, with_data=False)
    model = built.model
    ckpt = checkpoint_dir
    if ckpt is None and (Path(cfg.run.output_dir) / "checkpoints").is_dir():
        ckpt = cfg.run.output_dir
    loaded = load_trainable(model, ckpt) if ckpt is not None else None
    log(f"weights: {loaded if loaded is not None else 'as built (no checkpoint)'}")
    log(f"evaluating {len(samples)} samples ({source}) by greedy generation")
    use_cuda = torch.cuda.is_available() and not cfg.train.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    model.to(device)
    exact, preds = evaluate(
        model,
        built.collator,
        samples,
        batch_size=cfg.train.eval_batch_size,
        max_new_tokens=cfg.train.max_new_tokens,
        device=device,
        autocast=_autocast(cfg.train.mixed_precision, device),
        progress=cfg.run.progress,
    )
    if fmt is not None:
        summary, items = score_details(fmt, preds, rows)
        summary["exact_match"] = exact["accuracy"]
        title = f"{fmt}: {source} ({summary['n']} questions)"
    else:
        summary, items = exact, preds
        title = f"exact match: {source} ({summary['n']} questions)"
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.output_dir) / "eval"
    info = {"checkpoint": str(loaded), "eval_file": source, "metric": fmt or "exact_match"}
    _write(out, name, summary, items, info)
    log(format_table(title, summary))
    log(f"predictions: {out / f'predictions_{name}.jsonl'}")
    return summary


def _eval_set(
    cfg: Any, eval_file: str | os.PathLike | None, max_samples: int | None
) -> tuple[str, str | None, list[dict], list[dict], str]:
    """``(name, format, samples, rows, source)`` of the evaluation set a run names.

    Raises:
        ValueError: Neither an evaluation file nor a built-in task.
    """
    from ..data import validate_row

    d = cfg.data
    path = eval_file or d.eval_file
    if path is None and d.format is not None:  # the dataset's folder, its eval split
        path = d.train_file
    if path is None and d.task is not None:
        from ..tasks import load_task

        limit = max_samples if max_samples is not None else d.max_eval_samples
        kw = {"seed": cfg.run.seed, "question_types": d.question_types}
        task = load_task(d.task, "test", max_samples=limit, **kw)
        samples = [task[i] for i in range(len(task))]
        return d.task, None, samples, samples, f"{d.task} test split"
    if path is None:
        raise ValueError(
            "no evaluation data: set data.eval_file (or pass --eval-file) to a LLaVA-style "
            "JSON / JSONL file"
        )
    media = Path(d.media_root) if d.media_root else None
    fmt, located = read_eval_rows(path, d.format, d.eval_split, media)
    located = located if max_samples is None else located[:max_samples]
    root = media if media is not None else Path(path).parent
    samples = [validate_row(row, where, root) for where, row in located]
    rows = [row for _, row in located]
    if fmt is not None:  # the metric's references are found by the samples' ids
        for sample, row in zip(samples, rows):
            row.setdefault("id", sample["id"])
    name = fmt or Path(path).stem
    return name, fmt, samples, rows, Path(path).name


def _write(out: Path, name: str, summary: dict, items: list[dict], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"predictions_{name}.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    record = {"format": info["metric"], **info, "metrics": summary}
    (out / f"eval_{name}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
