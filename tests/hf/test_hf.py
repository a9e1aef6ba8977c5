"""The Hugging Face integration: registry, adapters, LoRA, Trainer / SFTTrainer callback.

Tiny random models built from configs (2 layers, width 32), offline, fixed seeds.
"""

from __future__ import annotations

import copy
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
import transformers as T  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from commit_mllm import CoMMIT, CoMMITConfig  # noqa: E402
from commit_mllm.hf import (  # noqa: E402
    STATE_FILE,
    CoMMITCallback,
    CoMMITTrainer,
    UnknownArchitectureError,
    build_components,
    commit_optimizer,
    commit_trainer_class,
    component_patterns,
    configure_training,
    make_adapter,
    supervised_forward,
)
from commit_mllm.method.lookahead import causal_lm_forward  # noqa: E402

T.logging.set_verbosity_error()
TOK = 100  # the image / audio placeholder id of every tiny model
TXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VIS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)


# ---- tiny models ----------------------------------------------------------------------------
def tiny_llava():
    cfg = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**VIS),
        text_config=T.LlamaConfig(**TXT),
        image_token_id=TOK,
        vision_feature_layer=-1,
    )
    return T.LlavaForConditionalGeneration(cfg)


def tiny_llava_next():
    cfg = T.LlavaNextConfig(
        vision_config=T.CLIPVisionConfig(**VIS),
        text_config=T.LlamaConfig(**TXT),
        image_token_id=TOK,
        vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64]],
    )
    return T.LlavaNextForConditionalGeneration(cfg)


def _qwen_vl(cls, cfg_cls):
    text = dict(TXT, rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4]})
    common = dict(num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if cfg_cls is T.Qwen2_5_VLConfig:
        vision = dict(
            common,
            depth=2,
            hidden_size=32,
            out_hidden_size=32,
            intermediate_size=64,
            fullatt_block_indexes=[1],
            window_size=16,
        )
    else:
        vision = dict(common, depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2)
    cfg = cfg_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=TOK,
        video_token_id=101,
        vision_start_token_id=102,
        vision_end_token_id=103,
    )
    return cls(cfg)


def tiny_qwen2_vl():
    return _qwen_vl(T.Qwen2VLForConditionalGeneration, T.Qwen2VLConfig)


def tiny_qwen2_5_vl():
    return _qwen_vl(T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLConfig)


def tiny_blip2():
    opt = T.OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=128,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
    )
    cfg = T.Blip2Config(
        vision_config=VIS,
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=128,
        ),
        text_config=opt.to_dict(),
        num_query_tokens=4,
        image_token_index=TOK,
    )
    return T.Blip2ForConditionalGeneration(cfg)


def tiny_internvl():
    vision = dict(VIS, image_size=[32, 32], patch_size=[8, 8])
    cfg = T.InternVLConfig(
        vision_config=vision,
        text_config=T.Qwen2Config(**TXT).to_dict(),
        image_token_id=TOK,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    return T.InternVLForConditionalGeneration(cfg)


def tiny_qwen2_audio():
    # max_source_positions=16: the encoder insists on 2 x 16 mel frames, not 30 s.
    audio = dict(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
    )
    cfg = T.Qwen2AudioConfig(
        audio_config=audio, text_config=T.Qwen2Config(**TXT).to_dict(), audio_token_index=TOK
    )
    return T.Qwen2AudioForConditionalGeneration(cfg)


MODELS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "blip2": tiny_blip2,
    "internvl": tiny_internvl,
    "qwen2_audio": tiny_qwen2_audio,
}


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return MODELS[kind]()


# ---- tiny data --------------------------------------------------------------------------------
def _modality_inputs(kind: str, rows: int, g: torch.Generator) -> dict:
    if kind in ("llava", "internvl", "blip2"):
        return {"pixel_values": torch.randn(rows, 3, 32, 32, generator=g)}
    if kind == "llava_next":
        return {
            "pixel_values": torch.randn(rows, 2, 3, 32, 32, generator=g),
            "image_sizes": torch.tensor([[32, 32]] * rows),
        }
    if kind in ("qwen2_vl", "qwen2_5_vl"):  # 4x4 patches of 4 px, merged 2x2: 4 tokens
        return {
            "pixel_values": torch.randn(rows * 16, 96, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * rows),
        }
    mask = torch.ones(rows, 32, dtype=torch.long)
    mask[1::2, 20:] = 0  # a shorter clip on odd rows
    return {
        "input_features": torch.randn(rows, 16, 32, generator=g),
        "feature_attention_mask": mask,
    }


def _token_counts(kind: str, model, enc: dict) -> list[int]:
    if kind == "qwen2_audio":
        lengths = enc["feature_attention_mask"].sum(-1)
        return model.model.audio_tower._get_feat_extract_output_lengths(lengths)[1].tolist()
    feats = make_adapter(model).encode(enc)["image"]
    if torch.is_tensor(feats):  # BLIP-2: [B, Q, d]
        return [feats.shape[1]] * feats.shape[0]
    return [f.shape[0] for f in feats]


def make_batch(kind: str, model, rows: int = 2, seed: int = 0, text: int = 6, ans: int = 3):
    """A right-padded batch: bos, expanded placeholders, text, supervised answer."""
    g = torch.Generator().manual_seed(seed)
    enc = _modality_inputs(kind, rows, g)
    counts = _token_counts(kind, model, enc)
    length = max(counts) + text + ans
    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r in range(rows):
        seq = (
            [1] + [TOK] * counts[r] + torch.randint(3, 90, (text + ans - 1,), generator=g).tolist()
        )
        n = len(seq)
        ids[r, :n], mask[r, :n] = torch.tensor(seq), 1
        labels[r, n - ans : n] = ids[r, n - ans : n]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, **enc}
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        batch["mm_token_type_ids"] = (ids == TOK).int()
    return batch


class Batches(Dataset):
    """Each item is a whole pre-collated batch (the Trainer runs with batch size 1)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def collate(items: list[dict]) -> dict:
    assert len(items) == 1
    return dict(items[0])


def args(tmp_path, steps: int = 2, **kw) -> T.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    base.update(kw)
    return T.TrainingArguments(**base)


class Recorder(T.TrainerCallback):
    """Keeps every log record."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def params_of(model, names) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n].detach().clone() for n in names}


# ---- registry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_adapter_matches_full_forward(kind):
    """decode(encode(batch)) == the model's full forward at supervised positions."""
    model = build(kind).eval()
    batch = make_batch(kind, model)
    adapter = make_adapter(model)
    with torch.no_grad():
        cached = adapter.decode(batch, adapter.encode(batch))
        full = causal_lm_forward(model, batch)
        head_only = supervised_forward(model, batch)
    assert cached.shape == (6, 128)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_only, full, atol=1e-5, rtol=1e-5)
    enc = {id(p) for p in adapter.encoder_parameters()}
    comps = build_components(model, "encoder")
    assert all(id(p) in enc for p in comps["encoder"].params)
    assert not any(id(p) in enc for p in comps["llm"].params)


@pytest.mark.parametrize("side", ["encoder", "llm", "own"])
def test_projector_side_blip2(side):
    model = build("blip2")
    comps = build_components(model, side)
    owner = {n: c.name for c in comps for n in c.names}
    expect = {"encoder": "encoder", "llm": "llm", "own": "projector"}[side]
    assert owner["query_tokens"] == expect
    assert owner["qformer.layernorm.weight"] == expect
    assert owner["language_projection.weight"] == expect
    assert owner["vision_model.embeddings.patch_embedding.weight"] == "encoder"
    assert owner["language_model.model.decoder.layers.0.fc1.weight"] == "llm"


def test_qwen2_vl_merger_is_projector():
    comps = build_components(build("qwen2_vl"), "own")
    assert comps["projector"].names and all(".merger." in n for n in comps["projector"].names)
    assert not any(".merger." in n for n in comps["encoder"].names)


def test_lora_names_land_in_their_component():
    model = configure_training(
        build("llava"),
        encoder={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        projector="full",
        llm={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    comps = build_components(model, "encoder", lrs={"encoder": 1e-3, "llm": 1e-3})
    print(comps.table())
    llm, enc = comps["llm"].names, comps["encoder"].names
    assert (
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"
        in llm
    )
    assert all("lora_" in n for n in llm)
    assert any("vision_tower" in n and "lora_A" in n for n in enc)
    assert any("multi_modal_projector" in n for n in enc)
    # Per-part rank through rank_pattern.
    named = dict(model.named_parameters())
    assert named[llm[0]].shape[0] == 4
    vis_a = next(n for n in enc if "lora_A" in n)
    assert named[vis_a].shape[0] == 2


def test_unknown_architecture_says_how_to_declare():
    model = T.LlamaForCausalLM(T.LlamaConfig(**TXT))
    with pytest.raises(UnknownArchitectureError, match=r"components=\{'encoder'"):
        build_components(model)
    comps = build_components(
        model,
        components={
            "encoder": ["model.embed_tokens"],
            "llm": ["model.layers", "lm_head", "model.norm"],
        },
    )
    assert comps["encoder"].names == ["model.embed_tokens.weight"]


def test_user_override_patterns():
    pats = component_patterns(
        "LlavaForConditionalGeneration",
        components={
            "encoder": "model.vision_tower",
            "llm": ["re:language_model|lm_head|projector"],
        },
    )
    assert pats["llm"] == ["re:language_model|lm_head|projector"]
    comps = build_components(build("llava"), components=pats)
    assert any("multi_modal_projector" in n for n in comps["llm"].names)


# ---- Trainer, every registered class ----------------------------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_trainer_two_steps_every_class(kind, tmp_path):
    model = build(kind)
    # Freeze the LLM's embeddings: a frozen part must stay bit-identical.
    model = configure_training(model, encoder="full", projector="full", llm="full")
    frozen = [
        n for n, _ in model.named_parameters() if "embed_tokens" in n or "embed_positions" in n
    ]
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    before = params_of(model, frozen)
    comps = build_components(model, "encoder", lrs={"encoder": 2e-3, "llm": 1e-3})
    data = Batches([make_batch(kind, model, seed=s) for s in range(2)])
    cb, rec = (
        CoMMITCallback(comps, CoMMITConfig(strategy="commit", window=1, exact=True)),
        Recorder(),
    )
    trainer = CoMMITTrainer(
        model=model,
        args=args(tmp_path),
        train_dataset=data,
        data_collator=collate,
        callbacks=[cb, rec],
    )
    trainer.train()
    assert cb.commit.meter.cached, "the registry adapter should be in use"
    steps = [r for r in rec.logs if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert math.isfinite(r["commit/kappa"]) and r["commit/kappa"] > 0
        assert r["lr/encoder"] > 0 and r["lr/llm"] > 0
        assert math.isfinite(r["grad_norm/encoder"]) and r["update_norm/llm"] > 0
        assert isinstance(r["commit/state"], str) and isinstance(r["commit/state_code"], int)
    for n, t in params_of(model, frozen).items():
        assert torch.equal(t, before[n]), n


def test_full_forward_fallback_without_adapter(tmp_path):
    model = build("llava")
    comps = build_components(model, "encoder", lrs=1e-3)
    data = Batches([make_batch("llava", model, seed=s) for s in range(2)])
    cb = CoMMITCallback(
        comps, CoMMITConfig(strategy="commit_clr", window=1, exact=True), adapter=None
    )
    CoMMITTrainer(
        model=model, args=args(tmp_path), train_dataset=data, data_collator=collate, callbacks=[cb]
    ).train()
    assert not cb.commit.meter.cached
    assert all(math.isfinite(h["commit/kappa"]) for h in cb.history)


# ---- the HF path == the core loop --------------------------------------------------------------
def _core_run(model, batches, lrs, cfg, clip=1.0):
    comps = build_components(model, "encoder", lrs=lrs)
    opt = torch.optim.AdamW(comps.param_groups(), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    commit = CoMMIT(
        make_adapter(model), opt, comps, cfg, total_steps=len(batches), schedule="constant"
    )
    out = []
    for batch in batches:
        logits = commit.forward(batch)
        lab = batch["labels"]
        ce = torch.nn.functional.cross_entropy(logits.float(), lab[:, 1:][lab[:, 1:] != -100])
        commit.backward(ce, commit.aux_loss(logits))
        commit.after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        commit.before_step()
        opt.step()
        out.append(commit.after_step().as_log())
        opt.zero_grad()
    return out


@pytest.mark.parametrize("strategy", ["commit", "ogm_ge", "feature_cd"])
def test_hf_path_equals_core_loop(strategy, tmp_path):
    steps = 6
    cfg = dict(strategy=strategy, window=2, gamma=0.3, cd_named_steps=2, cd_other_steps=1)
    cfg["exact"] = True  # every step measured: the two paths are compared step by step
    model = build("llava")
    twin = copy.deepcopy(model)
    batches = [make_batch("llava", model, rows=3, seed=s) for s in range(steps)]
    lrs = {"encoder": 3e-3, "llm": 1e-3}
    core = _core_run(twin, batches, lrs, CoMMITConfig(**cfg))

    comps = build_components(model, "encoder", lrs=lrs)
    cb = CoMMITCallback(comps, CoMMITConfig(**cfg))
    trainer = CoMMITTrainer(
        model=model,
        args=args(tmp_path, steps=steps),
        train_dataset=Batches(batches),
        data_collator=collate,
        callbacks=[cb],
    )
    # The Trainer shuffles; feed the batches in order as the core loop did.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(batches)
    trainer.train()
    assert len(cb.history) == steps
    for c, h in zip(core, cb.history):
        for key in ("lr/encoder", "lr/llm"):
            assert h[key] == pytest.approx(c[key], rel=1e-6, abs=1e-12), key
        if c.get("kappa") is not None:
            assert h["commit/kappa"] == pytest.approx(c["kappa"], rel=1e-6)
        assert h["commit/factor/llm"] == pytest.approx(c["factor/llm"], rel=1e-6)
    if strategy == "commit":
        assert core[-1]["factor/llm"] != 1.0, "the controller should have moved"
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_factor_multiplies_trainer_schedule(tmp_path):
    """Warmup + cosine keep working: lr/c = scheduler lr * f_c, never compounded."""
    steps = 8
    model = build("llava")
    batches = [make_batch("llava", model, seed=s) for s in range(steps)]
    comps = build_components(model, "encoder", lrs={"encoder": 2e-3, "llm": 1e-3})
    cb = CoMMITCallback(comps, CoMMITConfig(strategy="commit_clr", window=1, gamma=0.5, exact=True))
    trainer = CoMMITTrainer(
        model=model,
        args=args(tmp_path, steps=steps, lr_scheduler_type="cosine", warmup_steps=2),
        train_dataset=Batches(batches),
        data_collator=collate,
        callbacks=[cb],
    )
    trainer.train()
    sched = T.get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=1.0), 2, steps)
    prev = None
    for t, h in enumerate(cb.history):
        s = sched.get_last_lr()[0]
        sched.step()
        f_enc = prev["commit/factor/encoder"] if prev else 1.0
        f_llm = prev["commit/factor/llm"] if prev else 1.0
        assert h["lr/encoder"] == pytest.approx(2e-3 * s * f_enc, rel=1e-9, abs=1e-15), t
        assert h["lr/llm"] == pytest.approx(1e-3 * s * f_llm, rel=1e-9, abs=1e-15), t
        prev = h
    assert cb.history[1]["commit/factor/llm"] == 1.0  # no adjustment during warmup
    assert cb.history[-1]["commit/factor/llm"] != 1.0


# ---- checkpoints --------------------------------------------------------------------------------
def test_resume_restores_factors_and_window(tmp_path):
    steps = 6
    cfg = dict(strategy="commit", window=3, gamma=0.3, every=2)  # estimates at steps 1, 3, 5
    model = build("llava")
    fresh = copy.deepcopy(model)
    batches = [make_batch("llava", model, seed=s) for s in range(steps)]
    lrs = {"encoder": 3e-3, "llm": 1e-3}

    def trainer_for(m, out, cb, **kw):
        tr = CoMMITTrainer(
            model=m,
            args=args(tmp_path, steps=steps, output_dir=str(tmp_path / out), **kw),
            train_dataset=Batches(batches),
            data_collator=collate,
            callbacks=[cb],
        )
        tr._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(batches)
        return tr

    full = CoMMITCallback(build_components(model, "encoder", lrs=lrs), CoMMITConfig(**cfg))
    trainer_for(model, "a", full, save_strategy="steps", save_steps=3).train()
    assert os.path.isfile(tmp_path / "a" / "checkpoint-3" / STATE_FILE)

    resumed = CoMMITCallback(build_components(fresh, "encoder", lrs=lrs), CoMMITConfig(**cfg))
    trainer_for(fresh, "a", resumed).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3")
    )
    assert len(resumed.history) == 3
    a, b = full.commit.state_dict(), resumed.commit.state_dict()
    assert b["step"] == a["step"] == steps
    for k in ("z", "logk", "zbar"):
        assert len(a["tracker"][k]) == len(b["tracker"][k])
    assert a["tracker"]["estimates"] == b["tracker"]["estimates"]
    for c in ("encoder", "llm"):
        la, lb = a["scheduler"]["controller"]["log_f"][c], b["scheduler"]["controller"]["log_f"][c]
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-9)
    for h_full, h_res in zip(full.history[3:], resumed.history):
        assert h_res["lr/encoder"] == pytest.approx(h_full["lr/encoder"], rel=1e-5)
        assert h_res["commit/kappa_bar"] == pytest.approx(h_full["commit/kappa_bar"], rel=1e-4)


# ---- TRL ----------------------------------------------------------------------------------------
def test_sft_trainer_two_steps(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = configure_training(
        build("llava"),
        encoder="freeze",
        projector="full",
        llm={"r": 4, "target_modules": ["q_proj", "v_proj"]},
    )
    comps = build_components(model, "encoder", lrs={"encoder": 1e-3, "llm": 2e-3})
    rows = [make_batch("llava", model, rows=1, seed=s) for s in range(2)]
    ds = datasets.Dataset.from_list([{k: v[0].tolist() for k, v in r.items()} for r in rows])

    def collate_rows(items):
        return {k: torch.tensor([it[k] for it in items]) for k in items[0]}

    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=_word_level_tokenizer(), pad_token="<pad>", eos_token="<eos>"
    )
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        gradient_checkpointing=False,
        max_length=None,
    )
    cb, rec = (
        CoMMITCallback(comps, CoMMITConfig(strategy="commit", window=1, exact=True)),
        Recorder(),
    )
    trainer = commit_trainer_class(trl.SFTTrainer)(
        model=model,
        args=cfg,
        train_dataset=ds,
        data_collator=collate_rows,
        processing_class=tok,
        callbacks=[cb, rec],
    )
    trainer.train()
    steps = [r for r in rec.logs if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["commit/kappa"]) for r in steps)
    assert comps["encoder"].names and all(
        "multi_modal_projector" in n for n in comps["encoder"].names
    )


def _word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_commit_optimizer_named_groups(tmp_path):
    model = build("llava")
    comps = build_components(model, "own", lrs={"encoder": 1e-4, "projector": 1e-3, "llm": 2e-4})
    opt = commit_optimizer(comps, args(tmp_path), model=model)
    # Per component: the decay group, then biases and norm weights without decay.
    names = ["encoder", "encoder", "projector", "projector", "llm", "llm"]
    assert [g["name"] for g in opt.param_groups] == names
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4, 1e-3, 1e-3, 2e-4, 2e-4]
    assert [g["base_lr"] for g in opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert isinstance(opt, torch.optim.AdamW)
