"""GGUF loading: tiny models written the way llama.cpp writes them, and the dequantizers.

Each tiny random HF model is rewritten as a GGUF (llama.cpp tensor names and metadata keys,
llama's q/k row permutation) in F32, F16 and Q8_0. The reference is transformers run on the
same weights rounded the way the file stores them (F16: cast; Q8_0: dequantized by the
numpy block decoder below), so every storage type is held to the float32 tolerance; a looser
check against the unrounded model shows the quantization itself is benign.

The block decoders here are written from the GGML block layouts (ggml-common.h /
ggml-quants.c), independently of the ``gguf`` package that fcjax uses.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM

import fcjax
from fcjax.models import gguf_index, loading, registry

FAMILIES = ("llama-gqa-untied", "llama-tied-headdim", "qwen2-bias", "qwen3-qknorm")
SEQ = 24

# --- independent GGML block decoders (numpy) ------------------------------------------------


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    assert data.size % block_bytes == 0
    return data.reshape(-1, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian float16 from pairs of bytes on the last axis, as float32."""
    return b.copy().view("<f2").astype(np.float32)


def ref_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0: blocks of 32 = f16 scale d, 32 x int8 q; x = d * q."""
    b = _blocks(raw, 2 + 32)
    d = _f16(b[:, :2])
    q = b[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(-1)


def ref_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0: f16 d, 16 bytes; element j < 16 is the low nibble of byte j, j >= 16 the high
    nibble of byte j - 16; x = (q - 8) * d."""
    b = _blocks(raw, 2 + 16)
    d = _f16(b[:, :2])
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return ((q - 8.0) * d).reshape(-1)


def ref_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1: f16 d, f16 m, 16 bytes of nibbles (as Q4_0); x = q * d + m."""
    b = _blocks(raw, 4 + 16)
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    qs = b[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(-1)


def _scale_min_k4(sc: np.ndarray, j: int) -> tuple[int, int]:
    """ggml-quants.c get_scale_min_k4: 6-bit (scale, min) of sub-block j from 12 bytes."""
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


def ref_q4_k(raw: np.ndarray) -> np.ndarray:
    """Q4_K, a loop transcription of ggml-quants.c dequantize_row_q4_K.

    Super-block of 256 = f16 d, f16 dmin, 12 bytes of packed 6-bit (scale, min) for 8
    sub-blocks of 32, 128 bytes of nibbles; each 64 elements use 32 bytes: low nibbles with
    sub-block 2i, high nibbles with sub-block 2i+1; x = d * sc * q - dmin * m.
    """
    b = _blocks(raw, 4 + 12 + 128)
    out = np.empty((b.shape[0], 256), np.float32)
    for i, blk in enumerate(b):
        d, dmin = _f16(blk[0:2])[0], _f16(blk[2:4])[0]
        sc, qs = blk[4:16].astype(np.int32), blk[16:]
        for j in range(4):  # 64 elements from 32 bytes
            q = qs[32 * j : 32 * j + 32].astype(np.int32)
            s1, m1 = _scale_min_k4(sc, 2 * j)
            s2, m2 = _scale_min_k4(sc, 2 * j + 1)
            out[i, 64 * j : 64 * j + 32] = d * s1 * (q & 0xF) - dmin * m1
            out[i, 64 * j + 32 : 64 * j + 64] = d * s2 * (q >> 4) - dmin * m2
    return out.reshape(-1)


def ref_q6_k(raw: np.ndarray) -> np.ndarray:
    """Q6_K, a loop transcription of ggml-quants.c dequantize_row_q6_K.

    Super-block of 256 = 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8
    scales (one per 16 elements), f16 d; x = d * scale * (q - 32).
    """
    b = _blocks(raw, 128 + 64 + 16 + 2)
    out = np.empty((b.shape[0], 256), np.float32)
    for i, blk in enumerate(b):
        ql, qh = blk[:128].astype(np.int32), blk[128:192].astype(np.int32)
        sc = blk[192:208].view(np.int8).astype(np.float32)
        d = _f16(blk[208:210])[0]
        y = out[i]
        for n in range(2):  # two halves of 128
            qln, qhn, scn, yn = ql[64 * n :], qh[32 * n :], sc[8 * n :], y[128 * n :]
            for l in range(32):
                is_ = l // 16
                q1 = ((qln[l] & 0xF) | (((qhn[l] >> 0) & 3) << 4)) - 32
                q2 = ((qln[l + 32] & 0xF) | (((qhn[l] >> 2) & 3) << 4)) - 32
                q3 = ((qln[l] >> 4) | (((qhn[l] >> 4) & 3) << 4)) - 32
                q4 = ((qln[l + 32] >> 4) | (((qhn[l] >> 6) & 3) << 4)) - 32
                yn[l] = d * scn[is_] * q1
                yn[l + 32] = d * scn[is_ + 2] * q2
                yn[l + 64] = d * scn[is_ + 4] * q3
                yn[l + 96] = d * scn[is_ + 6] * q4
    return out.reshape(-1)


REFERENCE_DEQUANT = {
    QT.Q8_0: ref_q8_0,
    QT.Q4_0: ref_q4_0,
    QT.Q4_1: ref_q4_1,
    QT.Q4_K: ref_q4_k,
    QT.Q6_K: ref_q6_k,
}


def test_reference_decoders_on_hand_built_blocks():
    """The numpy decoders themselves, on blocks whose values are computed by hand."""
    d = np.float16(0.5).tobytes()
    m = np.float16(-1.0).tobytes()
    nib = bytes((j % 16) | ((15 - j % 16) << 4) for j in range(16))  # lo = j, hi = 15 - j
    lo, hi = np.arange(16.0), 15.0 - np.arange(16.0)
    got = ref_q4_0(np.frombuffer(d + nib, np.uint8))
    np.testing.assert_array_equal(got, 0.5 * (np.concatenate([lo, hi]) - 8))
    got = ref_q4_1(np.frombuffer(d + m + nib, np.uint8))
    np.testing.assert_array_equal(got, 0.5 * np.concatenate([lo, hi]) - 1.0)
    q = np.arange(-16, 16, dtype=np.int8)
    got = ref_q8_0(np.frombuffer(d + q.tobytes(), np.uint8))
    np.testing.assert_array_equal(got, 0.5 * q)


# --- writing tiny models as llama.cpp GGUF --------------------------------------------------

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_permute_inverse(w: np.ndarray, n_head: int) -> np.ndarray:
    """Interleaved pairs -> rotate-half rows (what a loader must do)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(w: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, the float32 values it decodes to per the independent decoder)."""
    if w.ndim == 1 or qtype == QT.F32:  # llama.cpp keeps 1-D tensors in F32
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == QT.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    raw = gguf.quants.quantize(w.astype(np.float32), qtype)
    return raw, REFERENCE_DEQUANT[qtype](raw).reshape(w.shape)


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's converter computes it for rope_type llama3 (per
    frequency: 1 above the high-frequency wavelength, ``factor`` below the low one, the
    smooth blend's reciprocal between), from the rope dict's
    ``original_max_position_embeddings``. (The converter reads that length from the top
    level of config.json with a default of 8192, which is the same number for every real
    Llama-3.x; this tiny model's 64 sits in the rope dict only.)"""
    rope = cfg["rope_parameters"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = rope["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def gguf_keys(cfg: dict) -> dict[str, tuple]:
    """The ``{arch}.*`` metadata llama.cpp's converter writes for this config.json, as
    ``{key: (value, GGUFValueType)}``."""
    V = gguf.GGUFValueType
    arch = cfg["model_type"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg["rope_parameters"]
    keys = {
        "block_count": (cfg["num_hidden_layers"], V.UINT32),
        "context_length": (cfg["max_position_embeddings"], V.UINT32),
        "embedding_length": (cfg["hidden_size"], V.UINT32),
        "feed_forward_length": (cfg["intermediate_size"], V.UINT32),
        "attention.head_count": (heads, V.UINT32),
        "attention.head_count_kv": (cfg["num_key_value_heads"], V.UINT32),
        "rope.freq_base": (rope["rope_theta"], V.FLOAT32),
        "attention.layer_norm_rms_epsilon": (cfg["rms_norm_eps"], V.FLOAT32),
    }
    if cfg.get("head_dim") is not None:
        keys["attention.key_length"] = (head_dim, V.UINT32)
        keys["attention.value_length"] = (head_dim, V.UINT32)
    if arch == "llama":  # LlamaModel adds the vocabulary size and the rotary width
        keys["vocab_size"] = (cfg["vocab_size"], V.UINT32)
        keys["rope.dimension_count"] = (head_dim, V.UINT32)
    if rope["rope_type"] == "linear":
        keys["rope.scaling.type"] = ("linear", V.STRING)
        keys["rope.scaling.factor"] = (rope["factor"], V.FLOAT32)
    elif rope["rope_type"] == "yarn":
        keys["rope.scaling.type"] = ("yarn", V.STRING)
        keys["rope.scaling.factor"] = (rope["factor"], V.FLOAT32)
        orig = rope["original_max_position_embeddings"]
        keys["rope.scaling.original_context_length"] = (orig, V.UINT32)
        for hf_key, key in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if rope.get(hf_key) is not None:
                keys[f"rope.scaling.{key}"] = (rope[hf_key], V.FLOAT32)
    return {f"{arch}.{k}": v for k, v in keys.items()}


def write_gguf(
    model_dir: Path,
    out: Path,
    qtype: QT,
    permute: bool = True,
    keys: dict | None = None,
    extra_tensors: dict | None = None,
    rope_freqs: bool = True,
) -> dict[str, np.ndarray]:
    """Writes model_dir as llama.cpp's converter would (its metadata keys, llama's q/k row
    permutation, ``rope_freqs.weight`` for llama3 rope), without tokenizer metadata.
    ``keys`` overrides metadata (a None value drops the key), ``extra_tensors`` adds
    tensors. Returns the HF-named float32 weights as the file stores them."""
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    for key, value in {**gguf_keys(cfg), **(keys or {})}.items():
        if value is not None:
            writer.add_key_value(key, *value)
    rounded = {}
    for hf_name, w in load_file(model_dir / "model.safetensors").items():
        name = gguf_name(hf_name)
        if permute and arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in name else kv_heads
            data, rounded[hf_name] = stored(llama_permute(w, n), qtype)
            rounded[hf_name] = llama_permute_inverse(rounded[hf_name], n)
        else:
            data, rounded[hf_name] = stored(w, qtype)
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    if rope_freqs and cfg["rope_parameters"]["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return rounded


def test_llama_permutation_round_trips():
    w = np.arange(4 * 6 * 3).reshape(24, 3)  # 4 heads, head_dim 6
    p = llama_permute(w, 4)
    # head 0 rows 0..5 = [x0 x1 x2 | y0 y1 y2] become interleaved [x0 y0 x1 y1 x2 y2]
    np.testing.assert_array_equal(p[:6, 0], w[[0, 3, 1, 4, 2, 5], 0])
    np.testing.assert_array_equal(llama_permute_inverse(p, 4), w)
    np.testing.assert_array_equal(loading.undo_llama_permutation(p, 4), w)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


def _torch_logits(model_dir: Path, ids: np.ndarray, weights=None) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if weights is not None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
        if model.config.tie_word_embeddings:
            model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0], ids=lambda q: q.name)
def test_gguf_logits_match_hf(family_dir, qtype, tmp_path, caplog):
    model_dir = family_dir
    ids = np.random.default_rng(0).integers(0, 128, size=(2, SEQ))
    path = tmp_path / "model.gguf"  # one stem for all: equal configs share the jit cache
    rounded = write_gguf(model_dir, path, qtype)

    with caplog.at_level(logging.WARNING, logger="fcjax"):
        lm = fcjax.load(path)
    assert lm.tokenizer is None
    assert "tokenizer" in caplog.text

    hf_cfg = loading.hf_config(model_dir)
    for field in ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers"):
        assert getattr(lm.config, field) == getattr(hf_cfg, field), field
    for field in ("num_heads", "num_kv_heads", "head_dim", "tie_embeddings", "qkv_bias"):
        assert getattr(lm.config, field) == getattr(hf_cfg, field), field
    assert (lm.config.qk_norm, lm.config.rope) == (hf_cfg.qk_norm, hf_cfg.rope)

    logits = lm.logits(ids)
    # Same stored values in both: float32 summation order is the only difference.
    ref = _torch_logits(model_dir, ids, rounded)
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    # Against the unrounded model: F16 keeps 11 significant bits (relative 2^-11 per weight)
    # and Q8_0 about 8 (step max|w|/127 per block of 32), so the logits move by a small
    # fraction of their spread; 3% of the largest logit bounds both with room to spare
    # and is still far below the error of a misplaced or mispermuted tensor.
    exact = ref if qtype == QT.F32 else _torch_logits(model_dir, ids)
    assert np.abs(logits - exact).max() < 0.03 * np.abs(exact).max()
    if qtype != QT.F32:
        assert not np.array_equal(ref, exact)  # the rounded reference really differs


def test_gguf_without_llama_permutation_differs(tmp_path):
    """A llama GGUF written without the q/k row permutation loads to different logits, so
    the parity test above would notice a missing or wrong un-permutation in fcjax."""
    model_dir = build_tiny("llama-gqa-untied", tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 128, size=(1, SEQ))
    path = tmp_path / "model.gguf"
    write_gguf(model_dir, path, QT.F32, permute=False)
    err = np.abs(fcjax.load(path).logits(ids) - _torch_logits(model_dir, ids)).max()
    assert err > 1e-2, err


# --- dequantization of real GGUF tensors ------------------------------------------------


def _same_index(path: Path) -> None:
    """``gguf_index.Index`` reads ``path`` as the ``gguf`` package's reader does: every
    field's value and type, every tensor's shape, type, offset, size and bytes."""
    ours, ref = gguf_index.Index(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        got, want = field.contents(), ref.fields[key].contents()
        assert got == want and type(got) is type(want), key
        if isinstance(want, list):
            assert field.count == len(want) and {type(x) for x in got} == {type(x) for x in want}
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (list(a.shape), a.tensor_type, a.data_offset, a.n_bytes, a.n_elements) == (
            list(b.shape),
            b.tensor_type,
            b.data_offset,
            b.n_bytes,
            b.n_elements,
        ), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


def test_index_reads_every_value_type_as_the_gguf_reader(tmp_path):
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    T = gguf.GGUFValueType
    values = {
        "t.u8": (7, T.UINT8), "t.i8": (-7, T.INT8), "t.u16": (700, T.UINT16),
        "t.i16": (-700, T.INT16), "t.u32": (70000, T.UINT32), "t.i32": (-70000, T.INT32),
        "t.f32": (0.1, T.FLOAT32), "t.bool": (True, T.BOOL), "t.u64": (2**40, T.UINT64),
        "t.i64": (-(2**40), T.INT64), "t.f64": (0.1, T.FLOAT64), "t.str": ("héllo", T.STRING),
        "t.strs": (["", "a", "ü\n", "x" * 300], T.ARRAY), "t.ints": ([1, -2, 3], T.ARRAY),
        "t.floats": ([0.5, -1.25], T.ARRAY),
    }  # fmt: skip
    for key, (value, kind) in values.items():
        writer.add_key_value(key, value, kind)
    writer.add_custom_alignment(256)  # the data starts at a multiple of 256
    rng = np.random.default_rng(0)
    writer.add_tensor("a", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("b", rng.standard_normal((4, 64)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), QT.Q8_0)
    writer.add_tensor("c", q8, raw_shape=q8.shape, raw_dtype=QT.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _same_index(path)
    assert gguf_index.Index(path).fields["t.strs"].contents() == ["", "a", "ü\n", "x" * 300]
    # a header cut short is an error naming what ended, not a partial index
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(gguf_index.HeaderError, match="ends inside its header"):
        gguf_index.Index(cut)


@pytest.mark.real
def test_index_reads_smollm2_as_the_gguf_reader():
    _same_index(registry.fetch("smollm2-135m-instruct"))


def _sample_tensors(reader, types, per_type: int = 3, max_elements: int | None = None):
    """Up to per_type tensors of each type, from the start, middle and end of the file."""
    picked: dict[QT, list] = {}
    for kind in types:
        of_kind = [
            t
            for t in reader.tensors
            if QT(t.tensor_type) == kind and (max_elements is None or t.n_elements <= max_elements)
        ]
        spots = sorted({0, len(of_kind) // 2, len(of_kind) - 1}) if of_kind else []
        picked[kind] = [of_kind[i] for i in spots][:per_type]
    return picked


def _check_dequantize(tensor, rows: int | None = None):
    got = loading.dequantize(tensor)
    shape = tuple(int(x) for x in reversed(tensor.shape))
    assert got.shape == shape and got.dtype == np.float32
    kind = QT(tensor.tensor_type)
    raw = np.asarray(tensor.data)
    if kind in (QT.F32, QT.F16):
        want = raw.astype(np.float32).reshape(shape)
    else:
        if rows is not None:  # the slow loop decoders see only the first rows
            raw, got = raw.reshape(shape[0], -1)[:rows], got[:rows]
        want = REFERENCE_DEQUANT[kind](raw).reshape(got.shape)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() and got.std() > 0


@pytest.mark.real
def test_dequantize_smollm2_tensors():
    reader = loading.gguf_reader(registry.fetch("smollm2-135m-instruct"))
    picked = _sample_tensors(reader, (QT.Q4_1, QT.Q8_0, QT.F32))
    for kind, tensors in picked.items():
        assert tensors, f"no {kind.name} tensor in the SmolLM2 GGUF"
        for t in tensors:
            _check_dequantize(t)


QWEN_GGUF = registry.model_dir("qwen2.5-coder-1.5b-instruct") / "model.gguf"


@pytest.mark.real
@pytest.mark.skipif(not QWEN_GGUF.exists(), reason="Qwen2.5-Coder GGUF not fetched")
def test_dequantize_qwen_k_quants():
    reader = loading.gguf_reader(QWEN_GGUF)
    # per-layer matrices (the 233M-element embedding and output would only add time)
    picked = _sample_tensors(reader, (QT.Q4_K, QT.Q6_K), per_type=2, max_elements=20_000_000)
    for kind, tensors in picked.items():
        assert tensors, f"no {kind.name} tensor in the Qwen GGUF"
        for t in tensors:
            _check_dequantize(t, rows=2)


# --- long-context rope: positions past the original context -------------------------------

LONG_CONTEXT = ("llama3-rope", "qwen2-yarn", "qwen3-yarn")  # original context 64
LONG_SEQ = 200


@pytest.fixture(scope="module", params=LONG_CONTEXT)
def long_dir(request, tmp_path_factory):
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16], ids=lambda q: q.name)
def test_gguf_long_context_logits_match_hf(long_dir, qtype, tmp_path):
    """Llama-3.1-style (llama3 rope as llama.cpp stores it: ``rope_freqs.weight``), Qwen2 and
    Qwen3 (yarn) GGUFs: logits at positions 0..199, past the original context of 64, equal
    transformers' on the same stored weights."""
    ids = np.random.default_rng(3).integers(0, 128, size=(1, LONG_SEQ))
    path = tmp_path / "model.gguf"
    rounded = write_gguf(long_dir, path, qtype)
    lm = fcjax.load(path)
    hf_cfg = loading.hf_config(long_dir)
    if hf_cfg.rope.rope_type == "llama3":  # the file carries it as divisors
        assert lm.config.rope.rope_type == "default" and lm.config.rope.freq_factors
    else:
        assert lm.config.rope == hf_cfg.rope
    err = np.abs(lm.logits(ids) - _torch_logits(long_dir, ids, rounded)).max()
    assert err < 1e-4, err


def test_gguf_rope_freqs_is_what_makes_llama3_match(tmp_path):
    """The same Llama-3.1-style file without ``rope_freqs.weight`` is plain rope, and its
    logits at long positions are far from transformers' (so the test above depends on
    fcjax applying the divisors)."""
    model_dir = build_tiny("llama3-rope", tmp_path / "hf")
    ids = np.random.default_rng(3).integers(0, 128, size=(1, LONG_SEQ))
    path = tmp_path / "model.gguf"
    write_gguf(model_dir, path, QT.F32, rope_freqs=False)
    lm = fcjax.load(path)
    assert lm.config.rope.freq_factors is None
    err = np.abs(lm.logits(ids) - _torch_logits(model_dir, ids)).max()
    assert err > 0.1, err


def test_gguf_rope_freqs_model_is_not_exported_with_another_rope(tmp_path):
    """transformers' config.json cannot hold llama.cpp's divisors: exporting refuses."""
    model_dir = build_tiny("llama3-rope", tmp_path / "hf")
    path = tmp_path / "model.gguf"
    write_gguf(model_dir, path, QT.F32)
    with pytest.raises(fcjax.models.ConfigError, match="rope_freqs"):
        fcjax.models.hf_config_dict(fcjax.load(path).config)


def test_rope_freqs_divide_the_frequencies():
    """freq_factors divide theta^(-2i/d) element by element (ggml's rope), computed here by
    hand for a 4-frequency head."""
    from fcjax.models.config import ModelConfig, RopeConfig
    from fcjax.models.rope import inv_frequencies

    factors = (1.0, 2.0, 4.0, 8.0)
    cfg = ModelConfig(
        family="llama",
        vocab_size=8,
        hidden_size=16,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=8,
        rope=RopeConfig(theta=10000.0, freq_factors=factors),
    )
    want = [10000.0 ** (-2 * i / 8) / f for i, f in enumerate(factors)]
    np.testing.assert_allclose(inv_frequencies(cfg)[0], want, rtol=1e-6)


# --- what a GGUF may not hide --------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny("llama-gqa-untied", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize(
    "extra", ["blk.0.ffn_gate_inp.weight", "rope_factors_long.weight", "vision.patch.weight"]
)
def test_gguf_unknown_tensor_is_refused_by_name(llama_dir, tmp_path, extra):
    path = tmp_path / "model.gguf"
    write_gguf(llama_dir, path, QT.F32, extra_tensors={extra: np.ones(8, np.float32)})
    with pytest.raises(fcjax.models.WeightError) as err:
        fcjax.load(path)
    assert repr(extra) in str(err.value) and str(path) in str(err.value)


def test_gguf_undecodable_metadata_is_refused_by_name(llama_dir, tmp_path):
    path = tmp_path / "model.gguf"
    bad = {"general.name": (b"tiny \xff\xfe llama", gguf.GGUFValueType.STRING)}
    write_gguf(llama_dir, path, QT.F32, keys=bad)
    with pytest.raises(fcjax.models.WeightError, match=r"'general\.name'.*cannot be decoded"):
        fcjax.load(path)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("llama.attention.sliding_window", (16, gguf.GGUFValueType.UINT32), "sliding_window"),
        ("llama.rope.dimension_count", (8, gguf.GGUFValueType.UINT32), "partial rotary"),
        ("llama.rope.scaling.type", ("longrope", gguf.GGUFValueType.STRING), "'longrope'"),
        ("llama.rope.scaling.yarn_log_multiplier", (0.1, gguf.GGUFValueType.FLOAT32), "yarn_log"),
        ("llama.expert_count", (8, gguf.GGUFValueType.UINT32), "expert_count"),
    ],
)
def test_gguf_metadata_fcjax_cannot_honour_is_refused_by_name(
    llama_dir, tmp_path, key, value, match
):
    path = tmp_path / "model.gguf"
    write_gguf(llama_dir, path, QT.F32, keys={key: value})
    with pytest.raises(fcjax.models.ConfigError, match=re.escape(str(path)) + ".*" + match):
        fcjax.load(path)


def test_gguf_required_metadata_is_named(llama_dir, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(llama_dir, path, QT.F32, keys={"llama.attention.layer_norm_rms_epsilon": None})
    with pytest.raises(
        fcjax.models.ConfigError, match=re.escape("llama.attention.layer_norm_rms_epsilon")
    ):
        fcjax.load(path)


def test_gguf_absent_keys_take_llama_cpp_defaults_logged_once(llama_dir, tmp_path, caplog):
    """Without rope.freq_base (llama.cpp: 10000), head_count_kv (= head_count) and the
    head sizes (embedding / heads), a file equal to the model in those values loads to the
    same config, and each default taken is logged once."""
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0
    path = tmp_path / "model.gguf"
    drop = ("rope.freq_base", "attention.key_length", "attention.value_length")
    write_gguf(llama_dir, path, QT.F32, keys={f"llama.{k}": None for k in drop})
    with caplog.at_level(logging.INFO, logger="fcjax"):
        lm = fcjax.load(path)
        fcjax.load(path)
    hf = loading.hf_config(llama_dir)
    assert (lm.config.rope.theta, lm.config.head_dim) == (hf.rope.theta, hf.head_dim)
    for key in drop:
        assert caplog.text.count(f"lacks llama.{key}") == 1, (key, caplog.text)


def test_gguf_stored_inv_freq_is_checked(llama_dir, tmp_path):
    """A stored rotary-frequency tensor (old converters' ``attn_rot_embd``) is accepted when
    it equals the frequencies the metadata implies and refused when it does not."""
    cfg = json.loads((llama_dir / "config.json").read_text())
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = (1.0 / 10000.0 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    path = tmp_path / "good.gguf"
    write_gguf(llama_dir, path, QT.F32, extra_tensors={"blk.0.attn_rot_embd": inv})
    fcjax.load(path)
    path = tmp_path / "bad.gguf"
    write_gguf(llama_dir, path, QT.F32, extra_tensors={"blk.0.attn_rot_embd": inv / 2})
    with pytest.raises(fcjax.models.WeightError, match=re.escape("'blk.0.attn_rot_embd'")):
        fcjax.load(path)
