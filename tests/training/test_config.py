"""Config scalars read as a user means them (by the field's type), threads, local folders."""

import math
from pathlib import Path

import pytest

from commit_mllm.cli import main
from commit_mllm.training.config import (
    ConfigError,
    RunConfig,
    check_local_files,
    config_notes,
    load_config,
)
from commit_mllm.training.config import resolve_num_threads as threads
from commit_mllm.training.config_ranges import FLOAT_RANGES, float_settings
from commit_mllm.training.config_values import from_dict, load_yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.lr=1e-4", "train.lr", 1e-4),
        ("train.lr=2E-5", "train.lr", 2e-5),
        ("train.lr=.5", "train.lr", 0.5),
        ("train.lr=3", "train.lr", 3.0),
        ("train.llm_lr=1e-3", "train.llm_lr", 1e-3),
        ("train.mixed_precision=no", "train.mixed_precision", "no"),
        ("train.cpu=off", "train.cpu", False),
        ("train.cpu=on", "train.cpu", True),
        ("train.cpu=yes", "train.cpu", True),
        ("train.cpu=False", "train.cpu", False),
        ("data.task=none", "data.task", None),
        ("data.task=null", "data.task", None),
        ("data.task=~", "data.task", None),
        ("data.task=", "data.task", None),
        ("model.preset=none", "model.preset", "none"),  # a str field: 'none' is a value
        ("run.output_dir=2024", "run.output_dir", "2024"),
        ("run.output_dir=1e-4", "run.output_dir", "1e-4"),  # text kept as typed
        ("run.seed=0x10", "run.seed", 16),
        ("train.component_lrs={encoder: 1e-5}", "train.component_lrs", {"encoder": 1e-5}),
        ("train.num_threads=2", "train.num_threads", 2),
        ("train.num_threads=auto", "train.num_threads", "auto"),
        ("data.question_types=[colour, shape]", "data.question_types", ["colour", "shape"]),
        ("train.mixed_precision='no'", "train.mixed_precision", "no"),
    ],
)
def test_override_scalars_are_read_by_the_field_type(override, key, expected):
    extra = ["model.mllm.vision.config={model_type: clip_vision_model}"]  # preset none needs it
    cfg = load_config(TINY, [override, "data.train_file=x.json", *extra])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == expected


def test_yaml_file_scalars_are_read_by_the_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {task: easy-vqa}\n"
        "model:\n"
        "  preset: tiny-random\n"
        "  mllm:\n"
        "    llm: {config: {model_type: llama, rms_norm_eps: 1e-5, tie_word_embeddings: no}}\n"
        "train: {lr: 1e-4, encoder_lr: 2E-5, mixed_precision: no, cpu: off, warmup_steps: 0}\n"
        "commit: {gamma: 5e-2, factor_caps: {encoder: 2e0}}\n"
    )
    cfg = load_config(path)
    assert cfg.train.lr == 1e-4 and cfg.train.encoder_lr == 2e-5
    assert cfg.train.mixed_precision == "no" and cfg.train.cpu is False
    assert cfg.commit.gamma == 0.05 and cfg.commit.factor_caps == {"encoder": 2.0}
    # A free-form dict (a transformers config) follows YAML 1.2's core schema.
    llm = cfg.model.mllm.llm.config
    assert llm["rms_norm_eps"] == 1e-5 and llm["tie_word_embeddings"] == "no"


def test_yaml_core_schema():
    data = load_yaml("a: 1e-4\nb: no\nc: ~\nd: [1, 2.5, off, 'x']\ne: .inf\nf: 0x1F\ng: TRUE\nh:")
    assert data == {
        "a": 1e-4,
        "b": "no",
        "c": None,
        "d": [1, 2.5, "off", "x"],
        "e": math.inf,
        "f": 31,
        "g": True,
        "h": None,
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=fast", "train.lr: expected a number, got str 'fast'"),
        ("train.steps=1e3", "train.steps: expected an integer, got str '1e3'"),
        ("train.cpu=maybe", "train.cpu: expected true or false, got 'maybe'"),
        ("train.steps=none", "train.steps: expected an integer, got str 'none'"),
        ("train.num_threads=-1", "train.num_threads = -1 is invalid: use auto, 0"),
        ("train.num_threads=many", "train.num_threads = 'many' is invalid: use auto, 0"),
        ("train.lr=[1", "override 'train.lr=[1': invalid value"),
    ],
)
def test_scalar_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(TINY, [override])


def test_validate_config_takes_key_value_like_every_command(capsys):
    assert main(["validate-config", TINY, "train.steps=7", "train.lr=1e-4"]) == 0
    assert "tiny.yaml: ok (strategy commit, preset tiny-random, task easy-vqa, 7 steps)" in (
        capsys.readouterr().out
    )
    assert main(["validate-config", TINY, "--set", "train.steps=8"]) == 0  # the old spelling
    assert "8 steps" in capsys.readouterr().out
    assert main(["validate-config", TINY, "train.stpes=8"]) == 2
    assert "unknown key 'train.stpes'; did you mean 'train.steps'?" in capsys.readouterr().err
    assert main(["validate-config", "train.steps=8"]) == 2
    assert "give at least one config file" in capsys.readouterr().err


def test_num_threads_auto_follows_the_load(monkeypatch):
    import torch

    monkeypatch.setattr("os.getloadavg", lambda: (3.2, 0.0, 0.0))
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(4)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads("auto")[0] == 1  # 4 cores, load 3.2: one core left
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    count, why = threads("auto")
    assert count == 4 and "auto: 4 cores, load 0.0, 1 process(es)" in why
    assert threads("auto", local_processes=2)[0] == 2  # the free cores are shared
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads("auto")[0] == 1  # never below one
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads("auto")[0] == 2  # never above torch's default (OMP_NUM_THREADS)
    assert threads(3) == (3, "3 (train.num_threads)")
    assert threads(0)[0] is None  # torch's default


def test_training_logs_the_thread_count(tmp_path):
    import torch

    from commit_mllm.training.startup import setup

    before = torch.get_num_threads()
    try:
        over = [f"run.output_dir={tmp_path}", "run.tensorboard=false", "train.num_threads=1"]
        lines = []
        setup(load_config(TINY, over), log=lines.append)
        assert "threads: 1 (train.num_threads)" in lines and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _local_model(tmp_path: Path, with_processor: bool) -> Path:
    """An encoder folder as save_pretrained leaves it (config.json + weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path / "clip"
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    CLIPVisionModel(cfg).save_pretrained(folder)
    if with_processor:
        (folder / "preprocessor_config.json").write_text("{}")
    return folder


def test_validate_config_checks_local_folders_and_model_processor(tmp_path, capsys):
    clip = _local_model(tmp_path, with_processor=False)
    base = ["model.preset=none", "model.tokenizer=gpt2", f"model.mllm.vision.name_or_path={clip}"]
    cfg = load_config(TINY, base)
    (note,) = config_notes(cfg)
    assert "has no preprocessor_config.json; a processor will be built from its config" in note
    assert main(["validate-config", TINY, *base]) == 0
    assert "note: model.mllm.vision.name_or_path" in capsys.readouterr().out
    cases = [
        (
            [f"model.processor={clip}"],
            f"model.processor = '{clip}': no preprocessor_config.json in that folder",
        ),
        ([f"model.processor={tmp_path}/nope"], "model.processor = '.*nope': folder not found"),
        (
            [f"model.mllm.vision.name_or_path={tmp_path}"],
            "model.mllm.vision.name_or_path = '.*': no config.json in that folder",
        ),
        (
            [f"model.mllm.vision.name_or_path={tmp_path}/gone"],
            "model.mllm.vision.name_or_path = '.*gone': folder not found",
        ),
    ]
    for extra, message in cases:
        cfg = load_config(TINY, [*base, *extra])  # loading a config reads no folders
        with pytest.raises(ConfigError, match=message):
            check_local_files(cfg)
        assert main(["validate-config", TINY, *base, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "model." in err
    # A hub id is not checked offline; a folder with a processor config is fine.
    check_local_files(load_config(TINY, [*base, "model.processor=openai/clip-vit-base-patch32"]))
    with_proc = _local_model(tmp_path / "b", with_processor=True)
    cfg = load_config(TINY, [*base, f"model.processor={with_proc}"])
    check_local_files(cfg)
    assert not config_notes(cfg)


def test_loaded_configs_hold_plain_python_values(tmp_path):
    """No YAML text wrapper leaks out: config.yaml, resume checks and hashes see plain types."""
    from commit_mllm.training.config_values import PlainScalar, to_dict

    over = ["train.lr=1e-4", "model.mllm.llm.config={model_type: llama, rms_norm_eps: 1e-5}"]
    over += ["data.question_types=[colour]", "train.component_lrs={llm: 2e-4}"]

    def walk(value):
        assert not isinstance(value, PlainScalar), value
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(to_dict(load_config(TINY, over)))


# ---- every float setting: finite and in its range ------------------------------------------
def _nested(key: str, value):
    """A config mapping that sets one dotted key ('*' = a mapping's key: 3 for replay steps)."""
    parts = key.split(".")
    index = {"replay": 3, "linesearch_alphas": 2}  # a sequence's item: the third path length
    parts = [index.get(parts[i - 1], "llm") if p == "*" else p for i, p in enumerate(parts)]
    data = value
    for i, p in reversed(list(enumerate(parts))):
        if parts[i - 1] == "linesearch_alphas":
            data = [0.25, 1.0, data]  # the sequence with this item at index 2
            continue
        data = {p: data}
    model = data.setdefault("model", {})
    model.setdefault("preset", "tiny-random")  # a model the rest of validate() accepts
    return data, ".".join(str(p) for p in parts)


def _out_of_range(allowed):
    if allowed.low is not None:
        return allowed.low - 1.0
    return allowed.high + 1.0


def test_every_float_setting_has_a_range_and_is_checked():
    """Walks the config dataclasses: a new float field must get a range, and NaN, inf, -inf and
    a value outside the range are each a one-line error naming the key."""
    keys = float_settings(RunConfig)
    assert "train.max_grad_norm" in keys and "commit.replay.*.*" in keys
    assert sorted(keys) == sorted(FLOAT_RANGES)
    for key in keys:
        allowed = FLOAT_RANGES[key]
        for bad in (math.nan, math.inf, -math.inf, _out_of_range(allowed)):
            data, concrete = _nested(key, bad)
            with pytest.raises(ConfigError) as err:
                from_dict(RunConfig, data).validate()
            message = str(err.value)
            assert f"{concrete} = {bad!r} is invalid: use " in message, message
            assert "\n" not in message
        data, _ = _nested(key, allowed.low if not allowed.low_open else allowed.low + 0.5)
        from_dict(RunConfig, data).validate()  # a value inside the range is accepted


def test_a_nan_clip_norm_is_refused_by_validate_config(capsys):
    assert main(["validate-config", TINY, "train.max_grad_norm=.nan"]) == 2
    assert capsys.readouterr().err == (
        f"commit-mllm validate-config: config error: {TINY}: train.max_grad_norm = nan is "
        "invalid: use a finite number >= 0\n"
    )
