"""Checkpoint publication, verification and safe loading (small torch modules, no trainer)."""

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

from commit_mllm.training.checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from commit_mllm.training.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


def _save(run_dir, step, value=0.0, keep_last=0):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(run_dir, step, model, opt, {"rng": rng_state()}, keep_last)


def _weight(folder) -> float:
    from safetensors.torch import load_file

    return float(load_file(str(Path(folder) / "trainable.safetensors"))["weight"][0, 0])


def test_the_manifest_lists_every_file_with_size_and_hash(tmp_path):
    ckpt = _save(tmp_path, 3)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["format"] == 2
    assert sorted(manifest["files"]) == ["optimizer.pt", "state.pt", "trainable.safetensors"]
    for name, meta in manifest["files"].items():
        assert meta["size"] == (ckpt / name).stat().st_size
        assert len(meta["sha256"]) == 64
    assert verify_checkpoint(ckpt) == manifest


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda f: (f / "trainable.safetensors").unlink(), "trainable.safetensors is missing"),
        (
            lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:-5]),
            "optimizer.pt has",
        ),
        (lambda f: _flip_last_byte(f / "state.pt"), "state.pt does not match its SHA-256"),
        (lambda f: (f / "manifest.json").unlink(), "no manifest.json (the save was cut short)"),
        (
            lambda f: (f / "manifest.json").write_text(json.dumps({"step": 4, "files": []})),
            "its manifest has no file sizes and hashes (written by an older commit-mllm)",
        ),
    ],
)
def test_a_broken_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, damage, reason):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    damage(newest)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000002"
    assert f"skipping checkpoint: {newest}: {reason}" in caplog.text
    with pytest.raises(CheckpointError, match=reason.split(" (")[0].replace("(", r"\(")):
        verify_checkpoint(newest)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_no_usable_checkpoint_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    ckpt = _save(tmp_path, 1)
    (ckpt / "state.pt").unlink()
    assert latest_checkpoint(tmp_path) is None


def test_keep_last_and_later_steps_are_pruned_after_publishing(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep_last=2)
    names = lambda: sorted(p.name for p in (tmp_path / "checkpoints").iterdir())  # noqa: E731
    assert names() == ["step-00000006", "step-00000008"]
    # A run resumed from 6 leaves 8 behind: publishing 7 removes it (a later --resume must
    # not jump to a step of the abandoned timeline).
    _save(tmp_path, 7, keep_last=2)
    assert names() == ["step-00000006", "step-00000007"]


def _resave_killed_at(run_dir: Path, point: str) -> None:
    os.environ["COMMIT_MLLM_KILL_AT"] = point
    _save(run_dir, 5, value=2.0)


@pytest.mark.parametrize("point", ["save:5:manifest", "save:5:aside", "save:5:published"])
def test_a_killed_resave_never_loses_the_good_copy(tmp_path, point):
    import multiprocessing

    _save(tmp_path, 5, value=1.0)
    child = multiprocessing.get_context("fork").Process(
        target=_resave_killed_at, args=(tmp_path, point)
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    chosen = latest_checkpoint(tmp_path)
    assert chosen is not None
    verify_checkpoint(chosen)
    # Before the rename the old copy is the one found (published, or set aside); after it,
    # the new one.
    assert _weight(chosen) == (2.0 if point == "save:5:published" else 1.0)
    if point == "save:5:aside":
        assert chosen.name.startswith(".old-step-00000005-")
    _save(tmp_path, 6)  # the next publish clears what the kill left
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in left if n.startswith(".")]


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    ckpt = save_checkpoint(
        tmp_path, 1, torch.nn.Linear(2, 2), torch.optim.SGD([torch.zeros(1)], lr=0.1), {}
    )
    state = {"rng": rng_state()}
    torch.save(state, tmp_path / "rng.pt")
    expect = (torch.rand(3), random.random(), np.random.standard_normal(2))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.standard_normal(2))
    assert torch.equal(expect[0], got[0]) and expect[1] == got[1]
    assert np.array_equal(expect[2], got[2])
    assert load_state(ckpt)["step"] == 1


class _RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rehash(folder: Path) -> None:
    """Make the manifest match the files again (what someone crafting a folder would do)."""
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        data = (folder / name).read_bytes()
        meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["state.pt", "optimizer.pt"])
def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path, name):
    ckpt = _save(tmp_path, 1)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _RunsAShellCommand(marker)}, ckpt / name)
    _rehash(ckpt)
    assert latest_checkpoint(tmp_path) == ckpt  # it verifies: the hashes are not the guard
    with pytest.raises(CheckpointError) as err:
        state = load_state(ckpt)
        load_optimizer_state(ckpt, state, fsdp=False)
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"{ckpt / name}: refused to load: it holds posix.system, not only tensors and plain "
        "data, so it may run code; use checkpoints written by commit-mllm from a source you "
        "trust"
    )
    assert not marker.exists()


def test_a_crafted_checkpoint_on_resume_is_one_cli_line(tmp_path, capsys):
    from commit_mllm.cli import main

    tiny = str(ROOT / "configs" / "tiny.yaml")
    args = ["train", "--config", tiny, f"run.output_dir={tmp_path}", "run.progress=false"]
    args += ["run.tensorboard=false", "train.steps=2", "train.save_every=1"]
    assert main(args) == 0
    ckpt = latest_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": _RunsAShellCommand(marker)}, ckpt / "state.pt")
    _rehash(ckpt)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"commit-mllm train: error: {ckpt / 'state.pt'}: refused to load")
    assert "Traceback" not in "\n".join(err)
    assert not marker.exists()
