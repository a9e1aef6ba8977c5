"""Reliability: bad inputs and failures give one clear line; non-finite losses are handled."""

import json
import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from commit_mllm.cli import main
from commit_mllm.data import DataFormatError, MediaError, load_audio
from commit_mllm.training.config import load_config
from commit_mllm.training.errors import NonFiniteError
from commit_mllm.training.startup import setup
from commit_mllm.training.tracking import read_jsonl
from commit_mllm.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["run.progress=false", "run.tensorboard=false"]


# Kills, signals and resume: tests/training/test_resume.py;
# checkpoint files: tests/training/test_checkpoint.py.


# ---- bad inputs: one clear line naming the file, row or key ---------------------------------
def _png(path, colour=(200, 30, 30)):
    Image.new("RGB", (16, 16), colour).save(path)


def _rows(tmp_path, n=6, **bad):
    rows = []
    for i in range(n):
        img = tmp_path / f"img{i}.png"
        _png(img, (40 * i, 30, 30))
        rows.append(
            {
                "id": f"r{i}",
                "image": img.name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": "red"},
                ],
            }
        )
    for i, row_patch in bad.items():
        rows[int(i[1:])].update(row_patch)
    return rows


def _write(tmp_path, rows, name="train.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows, indent=1))
    return path


def _train_args(tmp_path, data, *extra):
    return [
        "train",
        "--config",
        TINY,
        f"run.output_dir={tmp_path / 'run'}",
        "data.task=null",
        f"data.train_file={data}",
        "train.steps=2",
        "train.batch_size=6",
        "train.save_every=0",
        *QUIET,
        *extra,
    ]


def test_missing_image_names_the_row_and_file(tmp_path, capsys):
    data = _write(tmp_path, _rows(tmp_path, r3={"image": "nope.png"}))
    assert main(_train_args(tmp_path, data)) == 2
    err = capsys.readouterr().err
    assert "train.json row 3: image file 'nope.png' not found" in err


def test_corrupt_image_error_and_skip(tmp_path, capsys):
    data = _write(tmp_path, _rows(tmp_path))
    (tmp_path / "img2.png").write_bytes(b"\x89PNG not really")
    assert main(_train_args(tmp_path, data)) == 2
    err = capsys.readouterr().err
    assert "train sample 2 (id r2):" in err and "img2.png" in err
    run = tmp_path / "run"
    assert main(_train_args(tmp_path, data, "data.on_bad_sample=skip")) == 0
    skipped = read_jsonl(run / "skipped_samples.jsonl")
    assert {s["id"] for s in skipped} == {"r2"} and len(skipped) == 2  # once per step
    assert json.loads((run / "summary.json").read_text())["skipped_samples"] == 2


def test_json_syntax_error_has_line_and_column(tmp_path, capsys):
    data = tmp_path / "train.json"
    data.write_text('[\n {"id": "a",\n  "image": "x.png" "conversations": []}\n]')
    assert main(_train_args(tmp_path, data)) == 2
    assert "train.json: invalid JSON at line 3, column 20" in capsys.readouterr().err


def test_row_missing_a_field(tmp_path, capsys):
    rows = _rows(tmp_path)
    del rows[4]["conversations"]
    assert main(_train_args(tmp_path, _write(tmp_path, rows))) == 2
    assert "train.json row 4: missing field 'conversations'" in capsys.readouterr().err


def test_empty_answer(tmp_path, capsys):
    rows = _rows(tmp_path)
    rows[1]["conversations"][1]["value"] = "  "
    assert main(_train_args(tmp_path, _write(tmp_path, rows))) == 2
    assert "train.json row 1: turn 1 is an empty answer" in capsys.readouterr().err


def test_prompt_longer_than_max_length(tmp_path, capsys):
    rows = _rows(tmp_path)
    rows[0]["conversations"][0]["value"] = "<image>\n" + "what is this shape " * 40
    assert main(_train_args(tmp_path, _write(tmp_path, rows), "data.max_length=32")) == 2
    err = capsys.readouterr().err
    assert "train sample 0 (id r0): sample r0: max_length=32 cuts every answer" in err


def _wav(path, samples, rate=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.asarray(samples) * 32767).astype("<i2").tobytes())


def test_corrupt_empty_and_wrong_rate_audio(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(MediaError, match=r"bad\.wav"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    _wav(empty, [])
    with pytest.raises(MediaError, match=r"empty\.wav: the clip is empty \(0 samples\)"):
        load_audio(empty)
    slow = tmp_path / "8k.wav"
    t = np.arange(8000) / 8000
    _wav(slow, 0.5 * np.sin(2 * np.pi * 440 * t), rate=8000)
    clip = load_audio(slow)  # resampled to 16 kHz, not refused
    assert clip.shape == (16000,) and clip.dtype == np.float32


def test_unknown_key_and_wrong_type(capsys):
    assert main(["validate-config", TINY, "--set", "commit.gama=0.1"]) == 2
    assert "unknown key 'commit.gama'; did you mean 'commit.gamma'?" in capsys.readouterr().err
    assert main(["validate-config", TINY, "--set", "train.lr=fast"]) == 2
    assert "train.lr: expected a number, got str 'fast'" in capsys.readouterr().err


def test_component_without_trainable_parameters(tmp_path, capsys):
    args = [
        "train",
        "--config",
        TINY,
        f"run.output_dir={tmp_path}",
        "train.freeze_encoder=true",
        "train.freeze_projector=true",
        *QUIET,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "component 'encoder' has no trainable parameters" in err
    assert "commit.strategy=constant" in err


def _nan_after(model, bad_steps):
    calls = {"n": 0}

    def hook(module, inputs, output):
        # Count training forwards only (the meter's lookaheads run under no_grad).
        if not torch.is_grad_enabled():
            return output
        calls["n"] += 1
        if calls["n"] - 1 in bad_steps:
            return (output[0] * float("nan"), *output[1:])
        return output

    model.vision_projector.register_forward_hook(hook)
    return calls


def test_non_finite_loss_is_skipped_and_counted(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *QUIET, "train.steps=5"])
    s = setup(cfg, log=lambda _: None)
    _nan_after(s.parts.model, {2})
    summary = train(cfg, session=s)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert recs[2] == {"step": 2, "skipped": "non-finite loss or gradient"}
    assert all(np.isfinite(r["loss"]) for r in recs if r["step"] != 2)
    assert summary["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in s.parts.model.parameters())


def test_too_many_non_finite_losses_abort_and_keep_the_last_checkpoint(tmp_path):
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            *QUIET,
            "train.steps=8",
            "train.save_every=2",
            "train.max_bad_steps=2",
        ],
    )
    s = setup(cfg, log=lambda _: None)
    _nan_after(s.parts.model, set(range(3, 100)))
    with pytest.raises(NonFiniteError) as err:
        train(cfg, session=s)
    # 3 good steps, then step 3 skipped: checkpoint 4 is taken inside the streak, so the last
    # good one is 2, and 4 (the same weights: skipped steps update nothing) is removed.
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    assert str(err.value) == (
        "step 4: 2 non-finite losses or gradients in a row (train.max_bad_steps = 2); "
        f"aborting. Last good checkpoint: {ckpt}. Lower the learning rates (train.lr, "
        "train.*_lr) or check the data, then add --resume to continue from step-00000002"
    )
    assert err.value.step == 4 and err.value.checkpoint == ckpt
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_non_finite_streak_after_resume_keeps_the_checkpoints_before_it_and_names_the_setting(
    tmp_path, capsys
):
    """Rates of 1e30 given at --resume: the checkpoints taken during the streak (6, 8) do not
    rotate out 2 and 4 (keep_last = 2), and the abort names 4 and the changed rates."""
    args = ["train", "--config", TINY, f"run.output_dir={tmp_path}", *QUIET]
    args += ["train.save_every=2", "train.keep_last=2"]
    assert main([*args, "train.steps=4"]) == 0
    rates = ["train.lr=1e30", "train.llm_lr=1e30", "train.encoder_lr=1e30"]
    resumed = [*args, "train.steps=12", *rates, "train.max_bad_steps=4", "--resume"]
    assert main(resumed) == 1
    ckpts = tmp_path / "checkpoints"
    assert capsys.readouterr().err.splitlines()[-1] == (
        "commit-mllm train: error: step 8: 4 non-finite losses or gradients in a row "
        f"(train.max_bad_steps = 4); aborting. Last good checkpoint: {ckpts / 'step-00000004'}. "
        "Likely cause: settings changed at --resume from step 4: train.encoder_lr 0.001 -> "
        "1e+30; train.llm_lr 0.001 -> 1e+30; train.lr 0.001 -> 1e+30; set them back, then add "
        "--resume to continue from step-00000004"
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    skipped = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "skipped" in r]
    assert skipped == [5, 6, 7, 8]
    # With the rates set back, --resume continues from 4 and finishes.
    assert main([*args, "train.steps=6", "--resume"]) == 0
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(6))


def test_checkpoints_inside_a_streak_do_not_count_against_keep_last(tmp_path):
    from commit_mllm.training.checkpoint import non_finite_streak, save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    root = tmp_path / "checkpoints"
    for step, streak in [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]:
        save_checkpoint(tmp_path, step, model, opt, {"counters": {"bad_in_a_row": streak}}, 2)
    assert sorted(p.name for p in root.iterdir()) == [f"step-0000000{i}" for i in range(1, 6)]
    assert [non_finite_streak(root / f"step-0000000{i}") for i in range(1, 6)] == [0, 0, 1, 2, 3]
    # A clean 6: the newest clean earlier one (2) stays, and with it the streak after it.
    save_checkpoint(tmp_path, 6, model, opt, {"counters": {"bad_in_a_row": 0}}, 2)
    assert sorted(p.name for p in root.iterdir()) == [f"step-0000000{i}" for i in range(2, 7)]
    # A clean 7: 2 rotates out, and the streak checkpoints older than 6 go with it.
    save_checkpoint(tmp_path, 7, model, opt, {"counters": {"bad_in_a_row": 0}}, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000007"]


def test_loader_errors_are_data_format_errors(tmp_path):
    from commit_mllm.data import load_llava

    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"id": 1}\n{"id": 2, "conversations": [\n')
    with pytest.raises(DataFormatError, match=r"rows\.jsonl line 1: missing field 'conversations'"):
        load_llava(bad, check_files=False)


def test_a_line_cut_by_a_kill_does_not_block_resume(tmp_path):
    from commit_mllm.training.tracking import RunFormatError, RunLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.9}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.9}]
    RunLogger(tmp_path, tensorboard=False, resume_step=1).close()
    assert path.read_text() == '{"step": 0, "loss": 1.0}\n'
    path.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_jsonl(path)


# ---- the CLI: every failure is one line and an exit code; tracebacks only when asked -----------
RATE_KEYS = ["train.lr", "train.encoder_lr", "train.projector_lr", "train.llm_lr"]


@pytest.mark.parametrize("key", [*RATE_KEYS, "train.component_lrs.llm"])
@pytest.mark.parametrize("value,shown", [(".nan", "nan"), ("-1.0e-3", "-0.001"), (".inf", "inf")])
def test_a_bad_rate_for_any_component_is_a_config_error(tmp_path, capsys, key, value, shown):
    assert main(["validate-config", TINY, "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"commit-mllm validate-config: config error: {TINY}: {key} = {shown} is invalid: use a "
        "finite number >= 0\n"
    )
    assert main(["train", "--config", TINY, f"run.output_dir={tmp_path}", f"{key}={value}"]) == 2
    assert f"{key} = {shown} is invalid" in capsys.readouterr().err
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def _diverging(tmp_path):
    rates = [f"{k}=1.0e+30" for k in RATE_KEYS if k != "train.projector_lr"]
    return [
        "train",
        "--config",
        TINY,
        f"run.output_dir={tmp_path}",
        *QUIET,
        *rates,
        "train.max_bad_steps=2",
        "train.save_every=1",
    ]


def test_the_non_finite_abort_is_one_line_exit_1_and_debug_shows_the_traceback(
    tmp_path, capsys, monkeypatch
):
    assert main(_diverging(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("commit-mllm train: error: step 3: 2 non-finite losses or gradients")
    # Checkpoint 3 was taken inside the streak (step 2 skipped): 2 is the last good one.
    assert err[-1].endswith("then add --resume to continue from step-00000002")
    assert main([*_diverging(tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "NonFiniteError" in err
    monkeypatch.setenv("COMMIT_MLLM_DEBUG", "1")
    assert main(_diverging(tmp_path)) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_dead_run_fails_with_one_line_naming_the_step_and_the_cause(tmp_path, capsys):
    """Rates of 1e4 saturate the tiny model: every gradient is exactly 0 from step 2 on."""
    args = ["train", "--config", TINY, f"run.output_dir={tmp_path}", *QUIET, "train.steps=10"]
    rates = ["train.llm_lr=10000", "train.encoder_lr=10000", "train.max_dead_steps=4"]
    assert main([*args, *rates]) == 1
    err = capsys.readouterr().err
    loss = read_jsonl(tmp_path / "metrics.jsonl")[-1]["loss"]
    assert err == (
        "commit-mllm train: error: step 5: 4 steps in a row with every gradient exactly 0 and "
        f"the loss at {loss:.6g} (train.max_dead_steps = 4): the run has stopped learning. "
        "Likely cause: learning rates too high (a huge step saturates the model and its "
        "gradients vanish: lower train.lr, train.*_lr) or nothing left to train (every "
        "component frozen or at rate 0); fix it and start again\n"
    )
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["grad_norm"] for r in recs][2:] == [0.0] * 4 and recs[-1]["step"] == 5
    assert not (tmp_path / "summary.json").exists()
    # Off with 0; the same rates then run to the end.
    assert main([*args, *rates[:2], "train.max_dead_steps=0"]) == 0


def test_ctrl_c_before_training_and_an_unexpected_error_are_one_line(tmp_path, capsys, monkeypatch):
    import commit_mllm.training.startup as startup

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    args = ["train", "--config", TINY, f"run.output_dir={tmp_path}", *QUIET]
    monkeypatch.setattr(startup, "assemble", interrupted)
    assert main(args) == 130
    assert capsys.readouterr().err == (
        "commit-mllm train: interrupted (Ctrl-C); files already written are kept\n"
    )

    def broken(*_args, **_kwargs):
        raise TypeError("unsupported operand\ntype(s)")

    monkeypatch.setattr(startup, "assemble", broken)
    assert main(args) == 1
    assert capsys.readouterr().err == (
        "commit-mllm train: internal error: TypeError: unsupported operand type(s) (rerun with "
        "--debug or COMMIT_MLLM_DEBUG=1 for the traceback, and please report it)\n"
    )


def test_a_usage_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "train.steps=2"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "commit-mllm train: error: the following arguments are required: --config "
        "(see commit-mllm train --help)\n"
    )


def test_a_new_run_replaces_an_earlier_run_in_its_folder_and_says_so(tmp_path, caplog):
    args = ["train", "--config", TINY, f"run.output_dir={tmp_path}", *QUIET, "train.steps=2"]
    assert main([*args, "train.save_every=1"]) == 0
    assert main(args) == 0
    assert (
        f"{tmp_path}: replacing the files of an earlier run (metrics.jsonl, eval.jsonl, "
        "summary.json, checkpoints/, predictions/, plots/) because this run has no --resume"
    ) in caplog.text
    # Only this run's checkpoint (the final one): none of the earlier run's is left to resume.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


# ---- a failed --resume of a finished run leaves its folder as it found it -------------------
def _wav_rows(folder: Path, n=4):
    rows = []
    for i in range(n):
        t = np.arange(8000) / 16000
        _wav(folder / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t))
        rows.append(
            {
                "id": f"a{i}",
                "audio": f"c{i}.wav",
                "conversations": [
                    {"from": "human", "value": "<audio>\nHow many tones are there?"},
                    {"from": "gpt", "value": "two"},
                ],
            }
        )
    return rows


def _run_args(root: Path, audio: bool, *extra: str) -> list[str]:
    modality = ["model.mllm.audio.freeze=false"] if audio else []
    return [
        "train",
        "--config",
        TINY,
        f"run.output_dir={root / 'run'}",
        "data.task=null",
        f"data.train_file={root / 'train.json'}",
        "train.batch_size=6" if not audio else "train.batch_size=4",
        "train.save_every=0",
        "run.progress=false",
        "run.tensorboard=true",
        *modality,
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A finished 2-step run on image rows and one on audio clips (with TensorBoard)."""
    runs = {}
    for audio in (False, True):
        root = tmp_path_factory.mktemp("audio" if audio else "image")
        rows = _wav_rows(root) if audio else _rows(root)
        _write(root, rows)
        assert main(_run_args(root, audio, "train.steps=2")) == 0
        runs[audio] = root
    return runs


def _folder(run: Path) -> dict:
    """Every file's bytes, TensorBoard's as its scalars (tag, step, value)."""
    from test_resume import _tb_scalars

    files = {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and "tb" not in p.relative_to(run).parts
    }
    return {"files": files, "tb": _tb_scalars(run)}


def _long_prompt(root):
    rows = _rows(root)
    rows[0]["conversations"][0]["value"] = "<image>\n" + "what is this shape " * 40
    _write(root, rows)


def _text_as_jpeg(root):
    (root / "photo.jpg").write_text("this is not a picture\n")
    _write(root, _rows(root, r1={"image": "photo.jpg"}))


def _without(field):
    def apply(root):
        rows = _rows(root)
        del rows[4][field]
        _write(root, rows)

    return apply


def _empty_answer(root):
    rows = _rows(root)
    rows[1]["conversations"][1]["value"] = "  "
    _write(root, rows)


def _truncated_wav(root):
    data = (root / "c1.wav").read_bytes()
    (root / "c1.wav").write_bytes(data[:30])


def _header_only_wav(root):
    _wav(root / "c2.wav", [])


AT_RESUME = {
    # case: (audio, change to the inputs, overrides, exit code, part of the one-line error)
    "corrupt-png": (
        False,
        lambda r: (r / "img2.png").write_bytes(b"\x89PNG not really"),
        [],
        2,
        "train sample 2 (id r2):",
    ),
    "jpeg-that-is-text": (False, _text_as_jpeg, [], 2, "photo.jpg"),
    "prompt-longer-than-max-length": (
        False,
        _long_prompt,
        ["data.max_length=32"],
        2,
        "max_length=32 cuts every answer",
    ),
    "truncated-wav": (True, _truncated_wav, [], 2, "c1.wav"),
    "header-only-wav": (True, _header_only_wav, [], 2, "c2.wav: the clip is empty"),
    "missing-image": (
        False,
        lambda r: _write(r, _rows(r, r3={"image": "nope.png"})),
        [],
        2,
        "row 3: image file 'nope.png' not found",
    ),
    "json-syntax-error": (
        False,
        lambda r: (r / "train.json").write_text('[\n {"id": "a",\n  "image": "x" "c": []}\n]'),
        [],
        2,
        "invalid JSON at line 3",
    ),
    "row-missing-a-field": (False, _without("conversations"), [], 2, "missing field"),
    "empty-answer": (False, _empty_answer, [], 2, "turn 1 is an empty answer"),
    "unknown-key": (False, None, ["commit.gama=0.1"], 2, "unknown key 'commit.gama'"),
    "wrong-type": (False, None, ["train.lr=fast"], 2, "train.lr: expected a number"),
    "nan-rate": (False, None, ["train.llm_lr=.nan"], 2, "train.llm_lr = nan is invalid"),
    "nan-clip-norm": (
        False,
        None,
        ["train.max_grad_norm=.nan"],
        2,
        "train.max_grad_norm = nan is invalid",
    ),
    "nothing-trainable": (
        False,
        None,
        ["train.freeze_encoder=true", "train.freeze_projector=true"],
        2,
        "train.freeze_encoder: None -> True",
    ),
    "samples-per-step": (False, None, ["train.batch_size=3"], 2, "samples per optimizer step"),
    "non-finite-abort": (
        False,
        None,
        ["train.lr=1e30", "train.llm_lr=1e30", "train.encoder_lr=1e30", "train.max_bad_steps=2"],
        1,
        "non-finite losses or gradients in a row",
    ),
    "dead-run": (
        False,
        None,
        ["train.llm_lr=10000", "train.encoder_lr=10000", "train.max_dead_steps=2"],
        1,
        "the run has stopped learning",
    ),
}


@pytest.mark.parametrize("case", sorted(AT_RESUME))
def test_a_failed_resume_of_a_finished_run_changes_nothing_in_its_folder(
    finished_runs, tmp_path, capsys, case
):
    audio, change, overrides, code, message = AT_RESUME[case]
    root = tmp_path / "root"
    shutil.copytree(finished_runs[audio], root)
    before = _folder(root / "run")
    assert "summary.json" in before["files"] and before["tb"]
    if change is not None:
        change(root)
    capsys.readouterr()
    args = _run_args(root, audio, "train.steps=6", *overrides, "--resume")
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("commit-mllm train: ") and message in err[-1], err[-1]
    assert _folder(root / "run") == before


def test_training_does_not_import_deepspeed(tmp_path):
    """An optional dependency is imported where it is used: DeepSpeed prints a warning on
    import ("Setting accelerator to CPU"), so a run that does not use it must not load it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from commit_mllm.cli import main\n"
        f"rc = main(['train', '--config', {TINY!r}, 'run.output_dir={tmp_path}', "
        "'run.progress=false', 'run.tensorboard=false', 'train.steps=1'])\n"
        "assert rc == 0\n"
        "print('deepspeed' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert "Setting accelerator" not in out.stderr


def test_the_cli_keeps_an_installed_but_unused_deepspeed_quiet():
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    code = "from commit_mllm.cli import quiet_optional_imports as q; q(); import deepspeed"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "Setting accelerator to CPU" not in out.stderr + out.stdout


def test_progress_false_silences_the_libraries_bars(tmp_path):
    import transformers

    from commit_mllm.cli import main

    transformers.utils.logging.enable_progress_bar()
    argv = ["train", "--config", TINY, f"run.output_dir={tmp_path / 'r'}", "train.steps=1"]
    try:
        assert main([*argv, "run.progress=false", "train.save_every=0"]) == 0
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        transformers.utils.logging.enable_progress_bar()
