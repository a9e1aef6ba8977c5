"""IconQA (Lu et al., 2021): abstract-diagram questions, three sub-tasks.

Published layout (``src`` is ``iconqa_data/`` or the folder that contains it)::

    iconqa_data/problems.json      {pid: {question, choices, answer, ques_type, ...}}
    iconqa_data/pid_splits.json    {"choose_txt_train": [pid, ...], "fill_in_blank_val": ...}
    iconqa_data/iconqa/<split>/<sub_task>/<pid>/image.png   (+ choice_<k>.png, data.json)

``split`` is ``train``, ``val`` or ``test``, optionally with one sub-task:
``test/choose_txt``, ``test/fill_in_blank``. Without ``problems.json`` the per-problem
``data.json`` files are read instead. ``choose_img`` (the choices are images) is not
converted: the project's models see one image per question.

Multiple-choice rows are prompted with lettered options and answered by letter; fill-in-
the-blank rows by the answer itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from commit_mllm.formats import (
    LETTERS,
    SHORT_ANSWER,
    FormatError,
    check_media,
    check_split,
    find_dir,
    make_row,
    mc_prompt,
    read_json,
    require,
)

__all__ = ["SPLITS", "SUB_TASKS", "read"]

SPLITS = ("train", "val", "test")
SUB_TASKS = ("choose_txt", "fill_in_blank")
DATASET = "IconQA"
EXPECTED_PROBLEM = "an IconQA problem with question, answer, ques_type (and choices)"


def _data_root(src: Path) -> Path:
    """``iconqa_data/``: ``src`` itself or its child."""
    for cand in (src, src / "iconqa_data"):
        if (cand / "iconqa").is_dir() or (cand / "problems.json").is_file():
            return cand
    raise FormatError(
        f"{DATASET}: '{src}' is not an IconQA folder; expected iconqa_data/ with problems.json, "
        "pid_splits.json and iconqa/<split>/<sub_task>/<pid>/image.png"
    )


def _parse_split(split: str) -> tuple[str, tuple[str, ...]]:
    name, _, task = split.partition("/")
    check_split(name, SPLITS, DATASET)
    if task and task not in SUB_TASKS:
        hint = " (image choices are not supported)" if task == "choose_img" else ""
        raise FormatError(f"{DATASET}: unknown sub-task {task!r}{hint}; use {', '.join(SUB_TASKS)}")
    return name, (task,) if task else SUB_TASKS


def _problems_from_json(root: Path, split: str, task: str) -> list[tuple[str, Any, str]]:
    """``(pid, problem, where)`` from problems.json + pid_splits.json."""
    problems = read_json(root / "problems.json", DATASET, "iconqa_data/problems.json")
    splits = read_json(root / "pid_splits.json", DATASET, "iconqa_data/pid_splits.json")
    key = f"{task}_{split}"
    if not isinstance(splits, dict) or key not in splits:
        raise FormatError(f"{DATASET}: 'pid_splits.json' has no list '{key}'")
    out = []
    for pid in splits[key]:
        if str(pid) not in problems:
            raise FormatError(f"{DATASET}: pid {pid} of '{key}' is missing from 'problems.json'")
        out.append((str(pid), problems[str(pid)], f"problems.json[{pid!r}]"))
    return out


def _problems_from_folders(root: Path, split: str, task: str) -> list[tuple[str, Any, str]]:
    """``(pid, problem, where)`` from iconqa/<split>/<task>/<pid>/data.json."""
    folder = root / "iconqa" / split / task
    if not folder.is_dir():
        return []
    out = []
    for pid_dir in sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name)):
        if pid_dir.is_dir():
            path = pid_dir / "data.json"
            out.append((pid_dir.name, read_json(path, DATASET, EXPECTED_PROBLEM), str(path)))
    return out


def _row(pid: str, prob: Any, where: str, image: Path, task: str) -> dict[str, Any]:
    require(prob, ("question", "answer"), where, EXPECTED_PROBLEM)
    question = str(prob["question"]).strip()
    meta: dict[str, Any] = {"format": "iconqa", "pid": pid, "sub_task": task}
    if task == "choose_txt":
        require(prob, ("choices",), where, EXPECTED_PROBLEM)
        choices = [str(c) for c in prob["choices"]]
        idx = prob["answer"]
        if not isinstance(idx, int) or not 0 <= idx < len(choices) or len(choices) > 10:
            raise FormatError(
                f"{where}: 'answer' must be the index of one of the {len(choices)} choices"
            )
        meta.update(choices=choices, answer_idx=idx, answer=choices[idx])
        return make_row(pid, "image", image, mc_prompt(question, choices), LETTERS[idx], task, meta)
    meta["answer"] = str(prob["answer"])
    prompt = f"{question}\n{SHORT_ANSWER}"
    return make_row(pid, "image", image, prompt, meta["answer"], task, meta)


def read(src: Path, split: str, media_root: Path | None) -> list[dict[str, Any]]:
    """Read one split (optionally one sub-task) of IconQA.

    Args:
        src: ``iconqa_data/`` or its parent folder.
        split: ``train``, ``val``, ``test``, or ``<split>/<sub_task>``.
        media_root: Folder containing ``iconqa/`` when it is not ``iconqa_data/``.

    Returns:
        Rows with ``meta = {"format", "pid", "sub_task", "answer"}`` plus ``choices`` and
        ``answer_idx`` for ``choose_txt``.
    """
    name, tasks = _parse_split(split)
    root = _data_root(src)
    images = find_dir(media_root or root, ["iconqa", ""], DATASET, "image (iconqa/)")
    use_json = (root / "problems.json").is_file()
    out = []
    for task in tasks:
        if use_json:
            problems = _problems_from_json(root, name, task)
        else:
            problems = _problems_from_folders(root, name, task)
        for pid, prob, where in problems:
            if isinstance(prob, dict) and prob.get("ques_type", task) != task:
                raise FormatError(f"{where}: ques_type {prob['ques_type']!r} is not {task!r}")
            image = check_media(
                images / name / task / pid / "image.png",
                where,
                DATASET,
                "expected iconqa/<split>/<sub_task>/<pid>/image.png",
            )
            out.append(_row(pid, prob, where, image, task))
    if not out:
        raise FormatError(
            f"{DATASET}: no {name} problems for {', '.join(tasks)} under '{root}' "
            f"(expected iconqa/{name}/<sub_task>/<pid>/data.json or problems.json)"
        )
    return out
