"""Components: coverage errors name the parameter; groups; the table."""

import pytest
import torch

from commit_mllm import ComponentError, Components, check_param_groups, component_grad_norms
from toy import THREE, TWO, ToyMLLM


def test_split_by_prefix_and_regex():
    model = ToyMLLM(audio=True)
    comps = Components.from_model(model, THREE, lrs={"vision": 1e-3, "audio": 2e-3, "llm": 1e-4})
    assert comps.names == ["vision", "audio", "llm"]
    owned = {n for c in comps for n in c.names}
    assert owned == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("llm.") for n in comps["llm"].names)
    regex = Components.from_model(model, {"enc": ["re:(vision|audio)_"], "llm": "llm"}, 1e-3)
    assert regex["enc"].numel == comps["vision"].numel + comps["audio"].numel


def test_prefix_matches_on_dot_boundary_only():
    model = torch.nn.ModuleDict({"enc": torch.nn.Linear(2, 2), "enc2": torch.nn.Linear(2, 2)})
    with pytest.raises(ComponentError, match=r"'enc2\.weight' matches no component"):
        Components.from_model(model, {"a": "enc", "b": "re:^enc2\\.bias$"}, 1e-3)


def test_unmatched_and_double_matched_parameters_are_named():
    model = ToyMLLM()
    with pytest.raises(
        ComponentError, match=r"trainable parameter 'vision_projector\.weight' matches no"
    ):
        Components.from_model(model, {"encoder": ["vision_encoder"], "llm": ["llm"]}, 1e-3)
    with pytest.raises(
        ComponentError,
        match=r"trainable parameter 'llm\.embed\.weight' matches components 'a' and 'b'",
    ):
        Components.from_model(model, {"a": ["vision_", "re:^v", "llm"], "b": ["llm.embed"]}, 1e-3)


def test_declaration_errors():
    model = ToyMLLM()
    with pytest.raises(ComponentError, match="at least two components"):
        Components.from_model(model, {"all": ["vision_encoder", "vision_projector", "llm"]}, 1e-3)
    with pytest.raises(ComponentError, match="component 'audio' matches no parameter"):
        Components.from_model(model, {**TWO, "audio": ["audio_encoder"]}, 1e-3)
    with pytest.raises(ComponentError, match="no learning rate for component 'llm'"):
        Components.from_model(model, TWO, lrs={"encoder": 1e-3})


def test_param_groups_carry_name_and_base_lr_and_are_checked():
    model = ToyMLLM()
    comps = Components.from_model(
        model, TWO, lrs={"encoder": 1e-3, "llm": 1e-4}, weight_decay={"llm": 0.1}
    )
    opt = torch.optim.AdamW(comps.param_groups())
    assert [(g["name"], g["lr"], g["base_lr"]) for g in opt.param_groups] == [
        ("encoder", 1e-3, 1e-3),
        ("llm", 1e-4, 1e-4),
    ]
    assert opt.param_groups[1]["weight_decay"] == 0.1
    check_param_groups(opt, comps)
    missing = torch.optim.AdamW(comps.param_groups()[:1])
    with pytest.raises(ComponentError, match=r"'llm\.embed\.weight' is in no optimizer group"):
        check_param_groups(missing, comps)
    unnamed = torch.optim.AdamW(model.parameters())
    with pytest.raises(ComponentError, match="group named None is not a component"):
        check_param_groups(unnamed, comps)


def test_frozen_parameters_are_reported_not_grouped():
    model = ToyMLLM()
    for p in model.vision_encoder.parameters():
        p.requires_grad_(False)
    comps = Components.from_model(
        model,
        {"encoder": ["vision_encoder"], "projector": ["vision_projector"], "llm": ["llm"]},
        1e-3,
    )
    assert comps["encoder"].frozen and comps["encoder"].frozen_names == [
        "vision_encoder.0.weight",
        "vision_encoder.0.bias",
    ]
    assert [g["name"] for g in comps.param_groups()] == ["projector", "llm"]
    table = comps.table()
    assert table.splitlines()[0].split() == [
        "component",
        "tensors",
        "trainable",
        "frozen",
        "tensors",
        "base",
        "LR",
    ]
    assert "encoder" in table and "total" in table
    n_llm = sum(p.numel() for p in model.llm.parameters())
    assert f"{n_llm:,}" in table


def test_grad_norms():
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, 1e-3)
    assert component_grad_norms(comps) == {"encoder": 0.0, "llm": 0.0}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    norms = component_grad_norms(comps)
    assert norms["llm"] == pytest.approx(comps["llm"].numel ** 0.5)


def test_grad_norms_sum_squares_over_ranks():
    model = ToyMLLM()
    comps = Components.from_model(model, TWO, 1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    seen = []

    def two_ranks(t):  # both ranks hold a shard with the same entries
        seen.append(t.dtype)
        t.mul_(2)

    norms = component_grad_norms(comps, two_ranks)
    assert seen == [torch.float64]
    assert norms["llm"] == pytest.approx((2 * comps["llm"].numel) ** 0.5)
    assert norms["encoder"] == pytest.approx((2 * comps["encoder"].numel) ** 0.5)


def test_run_config_weight_decay_zero_is_zero_not_adamw_default(tmp_path):
    from pathlib import Path

    from commit_mllm.training.config import load_config
    from commit_mllm.training.startup import setup

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    cfg = load_config(tiny, [f"run.output_dir={tmp_path}", "run.progress=false"])
    assert cfg.train.weight_decay == 0.0
    s = setup(cfg, log=lambda _: None)
    assert [g["weight_decay"] for g in s.optimizer.param_groups] == [0.0, 0.0]
