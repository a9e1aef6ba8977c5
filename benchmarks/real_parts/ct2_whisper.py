"""CTranslate2 ``WhisperSpec`` model.bin -> transformers Whisper state dict (numpy only).

Binary layout (CTranslate2 binary version 6), little endian::

    uint32 version | string spec_name | uint32 revision | uint32 n_variables
    n_variables x (string name | uint8 rank | uint32 dims[rank] | uint8 dtype
                   | uint32 n_bytes | raw bytes)
    uint32 n_aliases | n_aliases x (string alias | string target)

``string`` = uint16 length (including a trailing NUL) + UTF-8 bytes + NUL.
dtype codes: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16 (not used here).

Name mapping (per layer ``i``; the decoder only for the zero-shot check):

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
from pathlib import Path
from typing import Any

import numpy as np

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
