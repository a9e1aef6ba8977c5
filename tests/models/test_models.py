"""Tests for commit_mllm.models: tiny MLLMs built from configs (offline, CPU)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from commit_mllm.models import (
    AudioEncoder,
    AudioEncoderConfig,
    LLMConfig,
    LoRASettings,
    MLLMConfig,
    MLPProjector,
    MultimodalLM,
    ProjectorConfig,
    QFormerProjector,
    VisionEncoderConfig,
    component_parameters,
    component_prefixes,
)

VOCAB = 100
IMG, AUD = 101, 102  # placeholder ids beyond the base vocabulary (embeddings are resized)
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
WHISPER = {
    "model_type": "whisper",
    "d_model": 32,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "num_mel_bins": 80,
    "vocab_size": 64,
    "max_target_positions": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
}


def vision_config(**kw) -> MLLMConfig:
    llm = kw.pop("llm", LLMConfig(config=LLAMA, vocab_size=104))
    return MLLMConfig(llm=llm, vision=VisionEncoderConfig(config=CLIP), image_token_id=IMG, **kw)


def audio_config(**kw) -> MLLMConfig:
    return MLLMConfig(
        llm=LLMConfig(config=LLAMA, vocab_size=104),
        audio=AudioEncoderConfig(config=WHISPER),
        audio_projector=kw.pop("audio_projector", ProjectorConfig(type="mlp", stride=2)),
        audio_token_id=AUD,
        **kw,
    )


def text_batch(bsz=3, seq=12, placeholders=((IMG, 2),), seed=0):
    """Right-padded ids with placeholders; answers at positions 7..8 (+ row 0 at the end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    for tok, pos in placeholders:
        ids[:, pos] = tok
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[1, seq - 2 :] = 0
    ids[1, seq - 2 :] = 0
    labels = torch.full((bsz, seq), -100)
    labels[:, 7:9] = ids[:, 7:9]
    labels[0, seq - 1] = ids[0, seq - 1]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "question_type": ["x"] * bsz,
    }


def vision_batch(bsz=3, seed=0):
    batch = text_batch(bsz, seed=seed)
    batch["pixel_values"] = torch.randn(
        bsz, 3, 32, 32, generator=torch.Generator().manual_seed(seed)
    )
    return batch


def audio_features(seconds=(0.8, 1.5), seed=0):
    """Whisper log-mels of random audio, padded only to the batch's longest clip."""
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(seed)
    clips = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    fe = WhisperFeatureExtractor(feature_size=80)
    out = fe(
        clips,
        sampling_rate=16000,
        padding="longest",
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_features, out.attention_mask


def audio_batch(seed=0):
    batch = text_batch(2, placeholders=((AUD, 3),), seed=seed)
    batch["input_features"], batch["feature_attention_mask"] = audio_features(seed=seed)
    return batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def manual_splice(model, batch, feats):
    """Per-row reference splice (python loop) -> padded embeds, mask, hidden index map."""
    emb = model.hf_llm.get_input_embeddings()
    rows, masks, index_maps = [], [], []
    for b in range(batch["input_ids"].shape[0]):
        parts, mparts, idx_map, cur = [], [], [], 0
        for j, tok in enumerate(batch["input_ids"][b].tolist()):
            if tok == IMG:
                parts.append(feats[b])
                mparts.append(torch.ones(feats.shape[1], dtype=torch.long))
                cur += feats.shape[1]
            else:
                parts.append(emb(torch.tensor([tok])))
                mparts.append(batch["attention_mask"][b, j : j + 1])
                cur += 1
            idx_map.append(cur - 1)
        rows.append(torch.cat(parts))
        masks.append(torch.cat(mparts))
        index_maps.append(idx_map)
    n = max(r.shape[0] for r in rows)
    embeds = torch.stack([nn.functional.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
    mask = torch.stack([nn.functional.pad(m, (0, n - m.shape[0])) for m in masks])
    return embeds, mask, index_maps


def test_forward_matches_manual_splice_and_loss():
    model = MultimodalLM(vision_config()).eval()
    batch = vision_batch()
    out = model(**batch)
    feats = model.encode(batch)["vision"]
    assert feats.shape == (3, 16, 32)  # 4x4 patches, CLS dropped
    embeds, mask, index_maps = manual_splice(model, batch, feats)
    seen = {}
    model._decoder_stack().register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    model(**batch)
    torch.testing.assert_close(seen["inputs_embeds"], embeds, rtol=0, atol=0)
    assert torch.equal(seen["attention_mask"], mask)
    full = model.hf_llm(inputs_embeds=embeds, attention_mask=mask).logits
    ref_logits, ref_targets = [], []
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1] - 1):
            if labels[b, j + 1] != -100:
                ref_logits.append(full[b, index_maps[b][j]])
                ref_targets.append(labels[b, j + 1])
    ref_logits = torch.stack(ref_logits)
    assert torch.equal(out.targets, torch.stack(ref_targets))
    assert torch.equal(out.targets, labels[:, 1:][labels[:, 1:] != -100])
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=1e-5)
    ce = -torch.log_softmax(ref_logits, -1).gather(1, out.targets[:, None]).mean()
    torch.testing.assert_close(out.loss, ce, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", ["encoder", "llm", "own"])
def test_encode_decode_protocol(side):
    model = MultimodalLM(vision_config(projector_side=side)).eval()
    batch = vision_batch()
    out = model(**batch)
    feats = model.encode(batch)
    width = 32  # LLM and encoder widths are both 32 here; check which module produced it
    assert feats["vision"].shape[-1] == width
    torch.testing.assert_close(model.decode(batch, feats), out.logits, rtol=0, atol=0)
    logits, targets = model.supervised_logits(batch)
    assert torch.equal(logits, out.logits) and torch.equal(targets, out.targets)
    expected = set(map(id, model.vision_encoder.parameters()))
    if side == "encoder":
        expected |= set(map(id, model.vision_projector.parameters()))
    assert {id(p) for p in model.encoder_parameters()} == expected
    sub_batch, sub_feats = model.select_rows(batch, feats, 2)
    assert sub_batch["input_ids"].shape[0] == 2 and sub_batch["question_type"] == ["x", "x"]
    assert sub_feats["vision"].shape[0] == 2
    torch.testing.assert_close(
        model.decode(sub_batch, sub_feats), model(**sub_batch).logits, rtol=0, atol=1e-6
    )


def test_whisper_encoder_any_length_batch_invariant():
    enc = AudioEncoder(config=WHISPER).eval()
    feats, fmask = audio_features((0.8, 1.5))
    out, lengths = enc(feats, fmask)
    assert out.shape == (2, 75, 32) and lengths.tolist() == [40, 75]
    alone, alone_len = enc(feats[:1, :, :80], fmask[:1, :80])
    assert alone_len.tolist() == [40]
    torch.testing.assert_close(out[0, :40], alone[0], rtol=0, atol=1e-5)
    # HF WhisperEncoder agrees on a full 30 s window (no padding, same weights).
    full = torch.randn(1, 80, 3000)
    ref = enc.hf_model(full).last_hidden_state
    torch.testing.assert_close(enc(full)[0], ref, rtol=0, atol=1e-5)
    # Longer than the positional table: windows are encoded separately and joined.
    short = AudioEncoder(config=WHISPER, max_source_positions=20).eval()
    assert short.hf_model.embed_positions.weight.shape[0] == 20
    long_out, long_len = short(
        torch.randn(2, 80, 100), torch.tensor([[1] * 100, [1] * 50 + [0] * 50])
    )
    assert long_out.shape == (2, 50, 32) and long_len.tolist() == [50, 25]
    assert torch.isfinite(long_out).all()


def test_audio_mllm_trains_on_mixed_lengths():
    model = MultimodalLM(audio_config())
    batch = audio_batch()
    feats = model.encode(batch)
    assert feats["audio"].shape == (2, 38, 32)  # 75 tokens merged by stride 2
    assert feats["audio_lengths"].tolist() == [20, 38]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_audio_qformer_window_mllm():
    proj = ProjectorConfig(type="qformer", num_queries=2, window_size=8, num_heads=2, num_layers=1)
    model = MultimodalLM(audio_config(audio_projector=proj))
    batch = audio_batch()
    feats = model.encode(batch)
    assert feats["audio"].shape == (2, 20, 32) and feats["audio_lengths"].tolist() == [10, 20]
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mlp_projector_shapes():
    x = torch.randn(2, 7, 16)
    y, lengths = MLPProjector(16, 24)(x)
    assert y.shape == (2, 7, 24) and lengths is None
    y, lengths = MLPProjector(16, 24, hidden_dim=40, stride=3)(x, torch.tensor([7, 4]))
    assert y.shape == (2, 3, 24) and lengths.tolist() == [3, 2]
    y, _ = MLPProjector(16, 24, stride=2, pool="avg")(x)
    assert y.shape == (2, 4, 24)


def test_qformer_projector_shapes():
    x = torch.randn(2, 10, 16)
    q = QFormerProjector(16, 24, hidden_dim=32, num_queries=4, num_layers=2, num_heads=4)
    y, lengths = q(x, torch.tensor([10, 3]))
    assert y.shape == (2, 4, 24) and lengths is None
    qw = QFormerProjector(16, 24, num_queries=2, num_layers=1, num_heads=2, window_size=4)
    y, lengths = qw(x, torch.tensor([10, 3]))
    assert y.shape == (2, 6, 24) and lengths.tolist() == [6, 2]
    assert torch.isfinite(y).all()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _step(model, batch, lr=0.1, steps=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def test_lora_on_llm_frozen_encoder():
    lora = LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    cfg = vision_config(llm=LLMConfig(config=LLAMA, vocab_size=104, lora=lora))
    cfg.vision.freeze = True
    model = MultimodalLM(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        ("lora_" in n and n.startswith("llm.")) or n.startswith("vision_projector.")
        for n in trainable
    )
    assert any(n.startswith("llm.base_model.model.") and "lora_A" in n for n in trainable)
    before = _snapshot(model)
    _step(model, vision_batch(), steps=2)  # lora_A gets a gradient once lora_B is non-zero
    after = _snapshot(model)
    for n in before:
        changed = not torch.equal(before[n], after[n])
        assert changed == (n in trainable), n
    split = component_parameters(model, "encoder")
    assert {n for ps in split.values() for n, _ in ps} == set(trainable)
    assert all(n.startswith("vision_projector.") for n, _ in split["encoder"])


def test_lora_on_encoder_and_full_finetune():
    lora = LoRASettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    cfg = vision_config()
    cfg.vision.lora = lora
    model = MultimodalLM(cfg)
    enc_train = [n for n, p in model.vision_encoder.named_parameters() if p.requires_grad]
    assert enc_train and all("lora_" in n for n in enc_train)
    assert all(p.requires_grad for p in model.llm.parameters())
    full = MultimodalLM(vision_config())
    before = _snapshot(full)
    _step(full, vision_batch())
    after = _snapshot(full)
    for n, p in full.named_parameters():
        assert torch.equal(before[n], after[n]) != p.requires_grad, n
    frozen = [n for n, p in full.named_parameters() if not p.requires_grad]
    assert frozen and all("post_layernorm" in n for n in frozen)  # unused pooling head


def test_component_prefixes_and_two_modalities():
    model = MultimodalLM(vision_config())
    assert component_prefixes(model) == {
        "encoder": ["vision_encoder.", "vision_projector."],
        "llm": ["llm."],
    }
    assert component_prefixes(model, "llm")["llm"] == ["llm.", "vision_projector."]
    assert component_prefixes(model, "own")["projector"] == ["vision_projector."]
    cfg = audio_config()
    cfg.vision, cfg.image_token_id = VisionEncoderConfig(config=CLIP), IMG
    both = MultimodalLM(cfg)
    assert list(component_prefixes(both)) == ["vision", "audio", "llm"]
    split = component_parameters(both)
    assert all(split[c] for c in ("vision", "audio", "llm"))
    batch = text_batch(2, placeholders=((IMG, 2), (AUD, 4)))
    batch["pixel_values"] = torch.randn(2, 3, 32, 32)
    batch["input_features"], batch["feature_attention_mask"] = audio_features()
    out = both(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape[0] == out.targets.shape[0]
    torch.testing.assert_close(both.decode(batch, both.encode(batch)), out.logits, rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    lora = LoRASettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = MultimodalLM(vision_config(llm=LLMConfig(config=LLAMA, vocab_size=104, lora=lora)))
    _step(model, vision_batch())  # move LoRA B away from zero
    model.eval()
    batch = vision_batch(seed=1)
    model.save_pretrained(tmp_path / "mllm")
    loaded = MultimodalLM.from_pretrained(tmp_path / "mllm").eval()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    assert loaded.vision_encoder.hf_model.config.num_hidden_layers == 1  # pruned to layer -2


def test_llm_from_local_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in LLAMA.items() if k != "model_type"}
    hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf.save_pretrained(tmp_path / "llm")
    model = MultimodalLM(
        vision_config(llm=LLMConfig(name_or_path=str(tmp_path / "llm"), vocab_size=104))
    )
    w = model.hf_llm.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, hf.model.layers[0].self_attn.q_proj.weight)
    assert model.hf_llm.get_input_embeddings().num_embeddings == 104
    assert torch.isfinite(model(**vision_batch()).loss)


def test_generate_left_padded_matches_single_rows():
    model = MultimodalLM(vision_config()).eval()
    batch = vision_batch()
    prompt = {k: v[:, :7] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
    prompt["attention_mask"] = prompt["attention_mask"].clone()
    prompt["attention_mask"][1, 5:] = 0  # row 1 is a shorter (right-padded) prompt
    out = model.generate(prompt, max_new_tokens=4)
    assert out.shape == (3, 4) and out.dtype == torch.long
    for b in range(3):
        n = int(prompt["attention_mask"][b].sum())
        single = {
            "input_ids": prompt["input_ids"][b : b + 1, :n],
            "attention_mask": prompt["attention_mask"][b : b + 1, :n],
            "pixel_values": prompt["pixel_values"][b : b + 1],
        }
        assert torch.equal(model.generate(single, max_new_tokens=4)[0], out[b]), b


def test_encoders_from_local_folders(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, WhisperConfig, WhisperModel

    whisper = WhisperModel(WhisperConfig(**{k: v for k, v in WHISPER.items() if k != "model_type"}))
    whisper.save_pretrained(tmp_path / "whisper")
    enc = AudioEncoder(name_or_path=str(tmp_path / "whisper"), max_source_positions=100)
    table = whisper.encoder.embed_positions.weight
    assert torch.equal(enc.hf_model.embed_positions.weight, table[:100])
    assert torch.equal(enc.hf_model.conv1.weight, whisper.encoder.conv1.weight)
    assert enc.window_frames == 200
    clip = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in CLIP.items() if k != "model_type"}))
    clip.save_pretrained(tmp_path / "clip")
    cfg = vision_config()
    cfg.vision = VisionEncoderConfig(name_or_path=str(tmp_path / "clip"), feature_layer=-2)
    model = MultimodalLM(cfg).eval()
    pixels = torch.randn(2, 3, 32, 32)
    ref = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(model.vision_encoder(pixels), ref, rtol=0, atol=1e-6)


DINOV2 = {
    "model_type": "dinov2",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "image_size": 56,
    "layerscale_value": 1.0,
}


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_vision_encoder_features(registers):
    from commit_mllm.models import VisionEncoder

    model_type = "dinov2_with_registers" if registers else "dinov2"
    cfg = {**DINOV2, "model_type": model_type}
    if registers:
        cfg["num_register_tokens"] = registers
    torch.manual_seed(0)
    enc = VisionEncoder(config=cfg, feature_layer=-2, drop_cls=True)
    assert len(enc.hf_model.encoder.layer) == 2  # the last layer is pruned
    px = torch.randn(2, 3, 28, 28)  # any multiple of 14: 2x2 patches
    feats = enc(px)
    assert feats.shape == (2, 4, 32)  # CLS (and registers) dropped, patches only
    with torch.no_grad():
        ref = enc.hf_model(pixel_values=px, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(feats, ref[:, 1 + registers :])
    # The final layernorm feeds only last_hidden_state and mask_token only masked modelling:
    # neither reaches the features, so neither trains.
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen == {
        "model.embeddings.mask_token",
        "model.layernorm.weight",
        "model.layernorm.bias",
    }
    feats.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    keep = VisionEncoder(config=cfg, feature_layer=-2, drop_cls=False)
    assert keep(px).shape == (2, 5 + registers, 32)


def test_dinov2_mllm_with_patch_merge_trains():
    cfg = MLLMConfig(
        llm=LLMConfig(config=LLAMA, vocab_size=VOCAB + 2),
        vision=VisionEncoderConfig(config=DINOV2, feature_layer=-1, freeze=True),
        vision_projector=ProjectorConfig(type="mlp", patch_merge=2),
        image_token_id=IMG,
    )
    torch.manual_seed(0)
    model = MultimodalLM(cfg)
    batch = {
        "input_ids": torch.tensor([[2, IMG, 5, 6, 7], [2, IMG, 8, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 6, 7], [-100, -100, -100, 9, -100]]),
        "pixel_values": torch.randn(2, 3, 56, 56),  # 4x4 patches -> 2x2 = 4 tokens
    }
    assert model.encode(batch)["vision"].shape == (2, 4, 32)
    loss = model(**batch).loss
    loss.backward()
    assert model.vision_projector.fc1.weight.grad is not None
    assert all(p.grad is None for p in model.vision_encoder.parameters())


@pytest.mark.parametrize("pool", ["concat", "avg"])
def test_patch_merge_groups_neighbouring_patches(pool):
    proj = MLPProjector(3, 5, patch_merge=2, pool=pool)
    x = torch.randn(2, 16, 3)  # a 4x4 grid, row-major
    merged = proj._merge_patches(x, None)
    grid = x.view(2, 4, 4, 3)
    block = grid[:, 2:4, 0:2].reshape(2, 4, 3)  # bottom-left 2x2 block = output token 2
    if pool == "concat":
        assert merged.shape == (2, 4, 12)
        assert torch.equal(merged[:, 2], block.reshape(2, 12))
    else:
        assert merged.shape == (2, 4, 3)
        assert torch.allclose(merged[:, 2], block.mean(1))
    out, lengths = proj(x)
    assert out.shape == (2, 4, 5) and lengths is None
    with pytest.raises(ValueError, match="square patch grid"):
        proj(torch.randn(2, 15, 3))
    with pytest.raises(ValueError, match="square patch grid"):
        proj(torch.randn(2, 9, 3))  # 3x3: 2 does not divide 3
    with pytest.raises(ValueError, match="not combined with stride"):
        MLPProjector(3, 5, stride=2, patch_merge=2)
