"""Convert the paper's datasets and evaluate a trained checkpoint with each dataset's metric.

The functions here take plain arguments (no argparse) so the CLI can wrap them::

    commit-mllm convert textvqa /data/textvqa data/paper/textvqa_val.jsonl --split val
    commit-mllm eval --config configs/paper/textvqa_llava15.yaml --checkpoint runs/x

:func:`run_eval` builds the run's model from its config, loads the trainable weights of a
checkpoint, greedily generates an answer for every question of the converted evaluation
file, scores them with :func:`commit_mllm.metrics.score_details`, writes per-question
predictions and the summary to the output folder, and prints a table.
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
    from .formats import convert

    n = convert(format_name, src, out, split=split, media_root=media_root, relative_to=relative_to)
    log(f"{format_name} {split}: wrote {n} rows to {out}")
    return n


def read_converted(path: str | os.PathLike) -> tuple[str, list[dict[str, Any]]]:
    """Read a converted JSONL file and the dataset format its rows carry.

    Args:
        path: A file written by :func:`run_convert`.

    Returns:
        ``(format_name, rows)``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: A row without ``meta.format`` (not a converted file), mixed formats, or
            an empty file.
    """
    from .data import DataFormatError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: '{path}'")
    rows, formats = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path.name} line {lineno}: invalid JSON ({exc.msg})") from None
        fmt = row.get("meta", {}).get("format") if isinstance(row, dict) else None
        if fmt is None:
            raise DataFormatError(
                f"{path.name} line {lineno}: no 'meta.format'; paper evaluation needs a file "
                "written by 'commit-mllm convert'"
            )
        formats.add(fmt)
        rows.append(row)
    if not rows:
        raise DataFormatError(f"{path.name}: no rows")
    if len(formats) > 1:
        raise DataFormatError(f"{path.name}: rows of several formats {sorted(formats)}")
    return formats.pop(), rows


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


def _samples(rows: list[dict], media_root: Path, max_samples: int | None) -> list[dict]:
    from .data import validate_row

    rows = rows if max_samples is None else rows[:max_samples]
    return [validate_row(r, f"row {i}", media_root) for i, r in enumerate(rows)]


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
    """Evaluate a checkpoint on a converted paper dataset (``commit-mllm eval``).

    Args:
        config_path: The run's YAML config (model, tokenizer, generation settings).
        checkpoint_dir: A checkpoint folder or a run folder (newest checkpoint). ``None``:
            the newest checkpoint of ``run.output_dir``, or the model as built (zero-shot)
            when the run has none.
        overrides: ``key=value`` config overrides.
        out_dir: Where predictions and the summary go (default
            ``<run.output_dir>/paper_eval``).
        eval_file: Converted JSONL to evaluate (default ``data.eval_file``).
        max_samples: Evaluate only the first N questions (default: all).
        log: Where progress lines and the table go.

    Returns:
        The metric summary (also in ``<out_dir>/eval_<format>.json``).

    Raises:
        ValueError: No evaluation file, a non-converted file, or a checkpoint that does
            not match the model.
    """
    from .assembly import assemble
    from .config import load_config
    from .evaluation import evaluate
    from .metrics import score_details

    cfg = load_config(config_path, overrides)
    path = eval_file or cfg.data.eval_file
    if path is None:
        raise ValueError("no evaluation file: set data.eval_file or pass eval_file")
    fmt, rows = read_converted(path)
    # Build the model without reading the training set: the eval file stands in for it.
    cfg.data.task, cfg.data.train_file, cfg.data.eval_file = None, str(path), None
    cfg.data.max_train_samples = 1
    built = assemble(cfg, log=log)
    model = built.model
    ckpt = checkpoint_dir
    if ckpt is None and (Path(cfg.run.output_dir) / "checkpoints").is_dir():
        ckpt = cfg.run.output_dir
    loaded = load_trainable(model, ckpt) if ckpt is not None else None
    log(f"weights: {loaded if loaded is not None else 'as built (no checkpoint)'}")
    media_root = Path(cfg.data.media_root) if cfg.data.media_root else Path(path).parent
    samples = _samples(rows, media_root, max_samples)
    use_cuda = torch.cuda.is_available() and not cfg.train.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    model.to(device)
    _, preds = evaluate(
        model,
        built.collator,
        samples,
        batch_size=cfg.train.eval_batch_size,
        max_new_tokens=cfg.train.max_new_tokens,
        device=device,
        autocast=_autocast(cfg.train.mixed_precision, device),
    )
    summary, items = score_details(fmt, preds, rows)
    out = Path(out_dir) if out_dir is not None else Path(cfg.run.output_dir) / "paper_eval"
    _write(out, fmt, summary, items, {"checkpoint": str(loaded), "eval_file": str(path)})
    log(format_table(f"{fmt}: {Path(path).name} ({summary['n']} questions)", summary))
    log(f"predictions: {out / f'predictions_{fmt}.jsonl'}")
    return summary


def _write(out: Path, fmt: str, summary: dict, items: list[dict], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"predictions_{fmt}.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    record = {"format": fmt, **info, "metrics": summary}
    (out / f"eval_{fmt}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
