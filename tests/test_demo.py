"""The demo's table file, the README block it fills, and Ctrl-C during the demo."""

import re
from pathlib import Path

import pytest

from commit_mllm.cli import main
from commit_mllm.demo import (
    DEMO_STRATEGIES,
    DEMO_TASKS,
    demo_fingerprint,
    readme_table,
    update_readme,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.preset=tiny-random",
    "model.image_size=32",
    "train.eval_every=0",
    "train.warmup_steps=0",
    "data.max_eval_samples=4",
    "data.max_train_samples=32",
    "run.progress=false",
    "run.tensorboard=false",
]


def _rows(table: str) -> list[list[str]]:
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.mark.parametrize("task", sorted(DEMO_TASKS))
def test_readme_demo_tables_come_from_the_demo_with_todays_settings(task):
    """The README's tables are the demo's table files, made with the current demo settings.

    A change of the demo's settings or strategies without re-running
    `commit-mllm demo --task TASK --update-readme README.md` fails here.
    """
    block = readme_table(ROOT / "README.md", task)
    made = re.search(r"<!-- written by `commit-mllm demo --task (\S+)` \(settings (\w+)\)", block)
    assert made, "the README block was not written by the demo (run it with --update-readme)"
    assert made.group(1) == task
    assert made.group(2) == demo_fingerprint(task), (
        f"README's {task} table was made with other settings: re-run "
        f"`commit-mllm demo --task {task} --update-readme README.md`"
    )
    rows = _rows(block)
    assert rows[0][:3] == ["strategy", "final loss (CE)", "accuracy"]
    assert rows[0][-2:] == ["steps per state", "final state"]
    assert [r[0] for r in rows[2:]] == list(DEMO_STRATEGIES)


def test_demo_writes_its_table_and_fills_the_readme(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- demo-table:easy-vqa -->\nold numbers\n<!-- /demo-table:easy-vqa -->\nend\n"
    )
    args = ["demo", "--output-dir", str(tmp_path / "d"), "--update-readme", str(readme)]
    # Three strategies: the table follows whatever strategies ran.
    short = [*TINY, "train.steps=3", "commit.every=1"]  # kappa in 3 steps: the README plot
    args += ["--strategies", "constant,commit_clr,commit", *short]
    assert main(args) == 0
    out = capsys.readouterr().out
    table_file = tmp_path / "d" / "easy-vqa" / "demo_table.md"
    assert f"table:  {table_file}" in out
    text = table_file.read_text()
    fp = demo_fingerprint("easy-vqa", ["constant", "commit_clr", "commit"], short)
    assert f"(settings {fp})" in text
    rows = _rows(text)
    assert [r[0] for r in rows[2:]] == ["constant", "commit_clr", "commit"]
    assert rows[0][:3] == ["strategy", "final loss (CE)", "accuracy"]
    assert set(rows[0][3:-3]) <= {"colour", "negation", "shape", "yes/no"}  # types evaluated
    assert rows[0][-3:] == ["median log κ (first → last quarter)", "steps per state", "final state"]
    for row in rows[2:]:
        shares = [int(m) for m in re.findall(r"(\d+)%", row[-2])]
        assert 99 <= sum(shares) <= 101  # rounded shares of every step
    image = "docs/images/demo_easy-vqa_kappa.png"
    assert (
        readme_table(readme, "easy-vqa")
        == f"{text.strip()}\n\n![kappa_bar of the easy-vqa demo runs]({image})"
    )
    assert (tmp_path / image).read_bytes() == (table_file.parent / "compare_kappa.png").read_bytes()
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("end\n") and "old numbers" not in body
    # The fingerprint moves with the settings and the strategies.
    assert demo_fingerprint("easy-vqa") != demo_fingerprint("easy-vqa", ["constant"])
    assert demo_fingerprint("easy-vqa") != demo_fingerprint("easy-vqa", overrides=["train.lr=1e-2"])
    # A strategy's own settings move it only when the demo runs that strategy.
    two = ["constant", "progress"]
    gain = ["commit.linesearch_gain=0.1"]
    assert demo_fingerprint("easy-vqa", two) == demo_fingerprint("easy-vqa", two, gain)
    assert demo_fingerprint("easy-vqa", ["line_search"]) != demo_fingerprint(
        "easy-vqa", ["line_search"], gain
    )
    cut = ["commit.progress_max_cut=10"]
    assert demo_fingerprint("easy-vqa", two) != demo_fingerprint("easy-vqa", two, cut)


def test_update_readme_needs_the_markers(tmp_path):
    readme = tmp_path / "R.md"
    readme.write_text("no markers\n")
    table = tmp_path / "t.md"
    table.write_text("| a |\n")
    with pytest.raises(ValueError, match=r"no '<!-- demo-table:tones-aqa -->' \.\.\."):
        update_readme(readme, "tones-aqa", table)


def test_ctrl_c_in_the_demo_keeps_a_checkpoint_and_says_how_to_resume(
    tmp_path, capsys, monkeypatch
):
    import os
    import signal

    import commit_mllm.training.trainer as trainer

    def interrupt_at(name):
        if name == "step:4":  # Ctrl-C during the fifth step of the first strategy
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer, "fault_point", interrupt_at)
    out = tmp_path / "d"
    over = [*TINY, "train.steps=6", "train.save_every=2"]
    assert main(["demo", "--output-dir", str(out), *over]) == 130
    err = capsys.readouterr().err
    ckpt = out / "easy-vqa" / "constant" / "checkpoints" / "step-00000005"
    assert f"interrupted during 'constant' ({out / 'easy-vqa' / 'constant'})" in err
    assert f"its newest checkpoint is {ckpt}" in err
    assert "Continue with: commit-mllm demo --task easy-vqa" in err and "--resume" in err
    assert ckpt.is_dir() and "Traceback" not in err

    monkeypatch.setattr(trainer, "fault_point", lambda name: None)
    assert main(["demo", "--output-dir", str(out), *over, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resume: from" in printed and "step-00000005" in printed
    steps = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (out / "easy-vqa" / "constant" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(6))  # steps 0-4 kept, 5 trained after the resume
    # A second --resume keeps both finished runs.
    assert main(["demo", "--output-dir", str(out), *over, "--resume"]) == 0
    assert printed.count("finished earlier") == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == len(DEMO_STRATEGIES)
