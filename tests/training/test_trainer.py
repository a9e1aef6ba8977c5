"""End to end: the tiny config through the trainer and the CLI; resume; audio; LLaVA JSON."""

import json
import math
from pathlib import Path

import pytest
import torch

from commit_mllm.cli import main
from commit_mllm.training.config import ConfigError, load_config
from commit_mllm.training.startup import setup
from commit_mllm.training.tracking import read_jsonl
from commit_mllm.training.trainer import train
from resume_helpers import assert_same_run, resume_a_copy

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
FIXTURES = ROOT / "tests" / "fixtures"
QUIET = ["run.progress=false", "run.tensorboard=false"]

STEP_KEYS = [
    "loss",
    "ce",
    "aux_loss",
    "grad_norm",
    "kappa",
    "kappa_bar",
    "state",
    "bias_index",
    "D/encoder",
    "D/llm",
    "lr/encoder",
    "lr/llm",
    "grad_norm/encoder",
    "grad_norm/llm",
    "update_norm/encoder",
    "update_norm/llm",
    "factor/encoder",
    "factor/llm",
]


def test_tiny_config_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, f"run.output_dir={out}", "run.progress=false"]) == 0
    recs = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(5))
    for r in recs:
        assert math.isfinite(r["loss"])
        for key in STEP_KEYS:
            assert key in r, key
        assert r["kappa"] is not None and r["kappa"] > 0
    assert (out / "summary.json").exists() and (out / "config.yaml").exists()
    assert list((out / "tb").iterdir())
    assert (out / "plots" / "kappa.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000005",
    ]
    printed = capsys.readouterr().out
    assert "component" in printed and "strategy=commit" in printed


def test_trainable_parameters_change_and_frozen_ones_do_not(tmp_path):
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            *QUIET,
            "model.mllm.vision.freeze=true",
            "train.save_every=0",
        ],
    )
    s = setup(cfg, log=lambda _: None)
    before = {n: p.detach().clone() for n, p in s.parts.model.named_parameters()}
    train(cfg, session=s)
    model = s.parts.model
    trainable = {n for c in s.parts.components for n in c.names}
    assert not any(n.startswith("vision_encoder.") for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    # The encoder component keeps the projector (projector_side: encoder).
    assert all(n.startswith("vision_projector.") for n in s.parts.components["encoder"].names)


def test_resume_from_step_3_reproduces_steps_4_and_5(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    overrides = [*QUIET, "model.mllm.vision_projector.dropout=0.1"]
    train(load_config(TINY, [f"run.output_dir={full}", *overrides]), log=lambda _: None)
    # A half-written checkpoint must be ignored, and a record past the checkpoint dropped.
    (part / "checkpoints" / ".tmp-step-00000004-1").mkdir(parents=True)
    logs = resume_a_copy(
        full, part, TINY, overrides, step=3, extra_lines=['{"step": 3, "junk": 1}']
    )
    assert any("resume: from" in line and "step 3" in line for line in logs)
    assert_same_run(full, part, final_step=5)


def test_audio_task_trains(tmp_path):
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            *QUIET,
            "data.task=tones-aqa",
            "train.steps=3",
            "train.save_every=0",
        ],
    )
    summary = train(cfg, log=lambda _: None)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["kappa"] > 0 and summary["n"] == 16


def test_llava_json_files_train(tmp_path):
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            *QUIET,
            "data.task=null",
            f"data.train_file={FIXTURES / 'images.json'}",
            f"data.eval_file={FIXTURES / 'images.json'}",
            "train.steps=2",
            "train.batch_size=2",
            "train.save_every=0",
        ],
    )
    summary = train(cfg, log=lambda _: None)
    assert summary["n"] == 2 and len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    preds = (tmp_path / "predictions" / "step-00000002.jsonl").read_text().splitlines()
    assert {json.loads(p)["id"] for p in preds} == {"r0", "r1"}


@pytest.mark.parametrize("config", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_validates(config, capsys):
    assert main(["validate-config", config]) == 0
    assert ": ok" in capsys.readouterr().out


def test_config_errors_name_the_key(tmp_path, capsys):
    assert main(["validate-config", TINY, "--set", "train.stpes=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.stpes'; did you mean 'train.steps'?" in err and "tiny.yaml" in err
    assert main(["validate-config", TINY, "--set", "train.steps=ten"]) == 2
    assert "train.steps: expected an integer, got str 'ten'" in capsys.readouterr().err
    assert main(["validate-config", TINY, "--set", "commit.strategy=adam"]) == 2
    assert "commit.strategy = 'adam' is invalid" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    assert main(["validate-config", str(bad)]) == 2
    assert "bad.yaml: invalid YAML at line" in capsys.readouterr().err
    assert main(["validate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_compare_and_plot_write_their_files(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--config",
        TINY,
        "--strategies",
        "constant,commit",
        "--seeds",
        "0",
        "--output-dir",
        str(out),
        "train.steps=3",
        "train.save_every=0",
        *QUIET,
    ]
    assert main(args) == 0
    assert (out / "compare.md").exists() and (out / "compare.json").exists()
    assert "constant" in (out / "compare.md").read_text()
    assert list(out.glob("*.png"))
    assert main(["plot", str(out / "constant-seed0"), "--compare", str(tmp_path / "pl")]) == 0
    assert (out / "constant-seed0" / "plots" / "loss.png").exists()
    assert list((tmp_path / "pl").glob("*.png"))


def test_local_pretrained_folders_go_through_the_hub_code_path(tmp_path):
    """preset none + name_or_path folders: the same from_pretrained path as hub ids."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from commit_mllm.data import train_tiny_tokenizer
    from commit_mllm.tasks import task_texts
    from commit_mllm.training.model_spec import TINY_CLIP, TINY_LLM

    tok = train_tiny_tokenizer(task_texts("easy-vqa"))
    tok.save_pretrained(tmp_path / "llm")
    llm = {k: v for k, v in TINY_LLM.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**llm, vocab_size=len(tok))).save_pretrained(tmp_path / "llm")
    clip = {k: v for k, v in TINY_CLIP.items() if k != "model_type"}
    CLIPVisionModel(CLIPVisionConfig(**clip, image_size=32)).save_pretrained(tmp_path / "clip")
    proc = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    proc(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path / 'run'}",
            *QUIET,
            "model.preset=none",
            f"model.mllm.llm.name_or_path={tmp_path / 'llm'}",
            f"model.mllm.vision.name_or_path={tmp_path / 'clip'}",
            "model.mllm.llm.lora.r=4",
            "train.steps=2",
            "train.save_every=0",
        ],
    )
    s = setup(cfg, log=lambda _: None)
    names = s.parts.components["llm"].names
    assert names and all("lora_" in n for n in names)
    train(cfg, session=s)
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_framework_aliases_in_run_configs(tmp_path, capsys):
    aliases = [
        "train.vit_lr=0.5",
        "train.freeze_vision_tower=true",
        "train.freeze_multi_modal_projector=false",
    ]
    cfg = load_config(None, ["model.preset=tiny-random", *aliases])
    assert cfg.train.encoder_lr == 0.5 and cfg.train.freeze_encoder is True
    assert cfg.train.freeze_projector is False
    with pytest.raises(ConfigError, match=r"'encoder_lr' = 0\.001 and 'vit_lr' = 0\.5"):
        load_config(TINY, ["train.vit_lr=0.5"])  # tiny.yaml sets encoder_lr
    args = [
        "validate-config",
        TINY,
        "--set",
        "train.mm_projector_lr=1",
        "--set",
        "train.aligner_lr=2",
    ]
    assert main(args) == 2
    assert "'mm_projector_lr' = 1 and 'aligner_lr' = 2" in capsys.readouterr().err
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", *QUIET, "train.freeze_vit=true"])
    s = setup(cfg, log=lambda _: None)
    assert all(n.startswith("vision_projector.") for n in s.parts.components["encoder"].names)


@pytest.mark.parametrize("task,name", [("easy-vqa", "demo_vision"), ("tones-aqa", "demo_audio")])
def test_demo_configs_match_the_demo(task, name):
    from commit_mllm.demo import demo_config

    assert load_config(ROOT / "configs" / f"{name}.yaml") == demo_config(task)


def test_demo_runs_end_to_end_on_tiny_parts(tmp_path, capsys):
    over = [
        "model.preset=tiny-random",
        "model.image_size=32",
        "train.steps=3",
        "train.eval_every=0",
        "train.warmup_steps=0",
        "data.max_eval_samples=8",
        "data.max_train_samples=32",
        "commit.exact=true",  # 3 steps: measure each, so the kappa plot has points
        *QUIET,
    ]
    assert main(["demo", "--output-dir", str(tmp_path), *over]) == 0
    out = capsys.readouterr().out
    assert "| constant |" in out and "| commit |" in out and "median log κ" in out
    assert (tmp_path / "easy-vqa" / "compare.md").exists()
    assert (tmp_path / "easy-vqa" / "commit" / "plots" / "kappa.png").exists()


def test_tones_shapes_trains_three_components(tmp_path):
    """The vision + audio task through the trainer: components vision, audio, llm."""
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            "data.task=tones-shapes",
            "data.max_train_samples=24",
            "data.max_eval_samples=6",
            "train.steps=3",
            "train.batch_size=3",
            "train.encoder_lr=0.002",
            "train.llm_lr=0.001",
            "commit.strategy=commit",
        ],
    )
    session = setup(cfg, log=lambda _: None)
    assert session.parts.components.names == ["vision", "audio", "llm"]
    base = {g["name"]: g["base_lr"] for g in session.optimizer.param_groups}
    assert base == {"vision": 0.002, "audio": 0.002, "llm": 0.001}
    summary = train(cfg, session=session, log=lambda _: None)
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    last = recs[-1]
    for c in ("vision", "audio", "llm"):
        assert last[f"D/{c}"] > 0 and math.isfinite(last[f"kappa_c/{c}"]), c
    assert last["kappa"] is None  # no pair of three components
    assert {"accuracy/and", "accuracy/select", "accuracy/count"} <= set(summary)


def test_freeze_encoder_freezes_a_lora_tower_entirely(tmp_path):
    """``train.freeze_encoder=true`` leaves nothing of the tower trainable, its LoRA included."""
    text = (
        Path(TINY)
        .read_text()
        .replace(
            "    vision_projector: {type: mlp}",
            "    vision_projector: {type: mlp}\n"
            "    vision:\n"
            "      freeze: true\n"
            "      lora: {r: 2, alpha: 4, dropout: 0.0, target_modules: [q_proj, v_proj]}",
        )
    )
    cfg_path = tmp_path / "lora_tower.yaml"
    cfg_path.write_text(text)
    base = [f"run.output_dir={tmp_path / 'run'}", *QUIET]

    def built(over):
        return setup(load_config(cfg_path, [*base, *over]), log=lambda _: None).parts

    def tower_trainable(parts):
        tower = parts.model.vision_encoder
        return [n for n, p in tower.named_parameters() if p.requires_grad]

    adapters = tower_trainable(built([]))
    assert adapters and all("lora_" in n for n in adapters)  # the config's LoRA trains
    frozen = built(["train.freeze_encoder=true"])
    assert tower_trainable(frozen) == []
    assert all(n.startswith("vision_projector.") for n in frozen.components["encoder"].names)
    assert tower_trainable(built(["train.freeze_vision_tower=true"])) == []
