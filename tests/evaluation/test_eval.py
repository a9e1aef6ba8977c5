"""`commit-mllm eval` on a run's own data: the LLaVA JSON / JSONL files train reads."""

import json
import shutil
from pathlib import Path

import pytest

from commit_mllm.cli import main
from commit_mllm.data import DataFormatError
from commit_mllm.evaluation.generate import normalize_answer
from commit_mllm.training.paper_eval import read_eval_rows

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture
def own_data(tmp_path):
    """images.json (a LLaVA JSON list), the same rows as JSONL, and a run config for them."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("images.json", "red.png", "blue.png"):
        shutil.copy(FIXTURES / name, data / name)
    rows = json.loads((data / "images.json").read_text())
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "own.yaml"
    config.write_text(
        f"""
run: {{output_dir: {tmp_path / "run"}, tensorboard: false, progress: false}}
data: {{task: null, train_file: {data / "images.json"}, eval_file: {data / "images.json"}}}
model: {{preset: tiny-random, image_size: 32, mllm: {{vision_projector: {{type: mlp}}}}}}
train: {{steps: 2, batch_size: 2, eval_batch_size: 2, max_new_tokens: 3, save_every: 0}}
commit: {{strategy: constant}}
"""
    )
    return {"data": data, "config": config, "run": tmp_path / "run", "rows": rows}


def test_eval_scores_the_json_and_jsonl_files_train_reads(own_data, tmp_path, capsys):
    config, data = str(own_data["config"]), own_data["data"]
    assert main(["train", "--config", config]) == 0
    capsys.readouterr()
    for name in ("images.json", "val.jsonl"):
        out = tmp_path / f"eval-{name}"
        args = ["eval", "--config", config, "--eval-file", str(data / name)]
        assert main([*args, "--output-dir", str(out)]) == 0
        stem = Path(name).stem
        record = json.loads((out / f"eval_{stem}.json").read_text())
        preds = [
            json.loads(x) for x in (out / f"predictions_{stem}.jsonl").read_text().splitlines()
        ]
        assert [p["id"] for p in preds] == ["r0", "r1"]
        # Exact match, recomputed here from the written predictions.
        correct = [
            normalize_answer(p["prediction"]) == normalize_answer(p["answer"]) for p in preds
        ]
        assert [p["correct"] for p in preds] == correct
        metrics = record["metrics"]
        assert metrics["n"] == 2 and metrics["accuracy"] == sum(correct) / 2
        assert metrics["accuracy/colour"] == float(correct[0])  # r0 is the colour question
        assert record["metric"] == "exact_match"
        assert record["checkpoint"].endswith("checkpoints/step-00000002")
        assert [p["answer"] for p in preds] == ["red", "blue"]  # the last gpt turn
        printed = capsys.readouterr().out
        assert f"exact match: {name} (2 questions)" in printed


def test_eval_defaults_to_data_eval_file_and_the_run_folder(own_data, capsys):
    assert main(["train", "--config", str(own_data["config"])]) == 0
    assert main(["eval", "--config", str(own_data["config"])]) == 0
    assert (own_data["run"] / "eval" / "eval_images.json").is_file()
    assert "weights: " + str(own_data["run"] / "checkpoints" / "step-00000002") in (
        capsys.readouterr().out
    )


def test_eval_on_a_builtin_task_scores_its_test_split(tmp_path):
    from commit_mllm.training.paper_eval import run_eval

    tiny = ROOT / "configs" / "tiny.yaml"
    over = [f"run.output_dir={tmp_path / 'none'}", "data.max_eval_samples=5"]
    summary = run_eval(tiny, overrides=over, out_dir=tmp_path / "e", log=lambda _: None)
    assert summary["n"] == 5 and 0.0 <= summary["accuracy"] <= 1.0
    assert any(k.startswith("accuracy/") for k in summary)
    assert (tmp_path / "e" / "eval_easy-vqa.json").is_file()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_eval_rows_plain_named_and_every_error(tmp_path):
    row = {
        "id": "1",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    }
    named = {**row, "meta": {"format": "textvqa"}}
    plain = _write(tmp_path / "plain.json", json.dumps([row, row]))
    assert read_eval_rows(plain)[0] is None
    assert [w for w, _ in read_eval_rows(plain)[1]] == ["plain.json row 0", "plain.json row 1"]
    conv = _write(tmp_path / "conv.jsonl", json.dumps(named) + "\n")
    assert read_eval_rows(conv)[0] == "textvqa"
    cases = [
        (_write(tmp_path / "a.csv", "id,answer\n1,x\n"), r"expected a LLaVA-style JSON list"),
        (_write(tmp_path / "d.json", "{}"), r"d.json: top level must be a JSON list of rows"),
        (_write(tmp_path / "e.jsonl", ""), r"e.jsonl: no rows"),
        (_write(tmp_path / "bad.jsonl", "{nope\n"), r"bad.jsonl line 1: invalid JSON"),
        (
            _write(tmp_path / "m.jsonl", json.dumps(named) + "\n" + json.dumps(row) + "\n"),
            r"m.jsonl line 2: no 'meta.format' while other rows name 'textvqa'",
        ),
        (
            _write(tmp_path / "u.jsonl", json.dumps({**row, "meta": {"format": "vqa9"}}) + "\n"),
            r"u.jsonl line 1: meta.format 'vqa9' is not a known dataset .*exact match",
        ),
        (tmp_path, r"expected a LLaVA-style JSON list .*needs data.format"),
    ]
    for path, message in cases:
        with pytest.raises(DataFormatError, match=message):
            read_eval_rows(path)
    with pytest.raises(FileNotFoundError, match="evaluation file not found"):
        read_eval_rows(tmp_path / "missing.json")


def test_eval_errors_are_one_line(own_data, tmp_path, capsys):
    config = str(own_data["config"])
    csv = _write(tmp_path / "val.csv", "question,answer\nq,a\n")
    assert main(["eval", "--config", config, "--eval-file", str(csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected a LLaVA-style JSON list" in err
    assert main(["eval", "--config", config, "data.eval_file=null", "data.train_file=x"]) == 2
    assert "no evaluation data: set data.eval_file" in capsys.readouterr().err
