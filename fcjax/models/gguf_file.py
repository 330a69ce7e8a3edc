"""GGUF files as llama.cpp writes them: metadata -> ``ModelConfig``, tensors -> HF names.

Nothing in a file is skipped silently. Every tensor is either mapped to a decoder weight,
consumed into the config (``rope_freqs.weight``: llama.cpp's per-frequency rope divisors,
how its converter stores Llama-3 rope scaling) or refused with a ``WeightError`` naming it.
Every metadata field must decode, and every ``{arch}.*`` key is either read or refused with
a ``ConfigError`` naming it. A key the file omits takes llama.cpp's default for these
architectures (``llama_model::load_hparams``), or is an error where llama.cpp requires it;
the defaults taken are logged once.

Tensor data is read with plain file reads (every page of a mapping a loader touches stays in
the process's resident set until the mapping goes away)
and dequantized in bounded row chunks, so loading holds at most one tensor beyond the
model.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fcjax.models import gguf_index
from fcjax.models.config import ConfigError, ModelConfig, RopeConfig

log = logging.getLogger("fcjax")

ARCHITECTURES = ("llama", "qwen2", "qwen3")


class GGUFError(ValueError):
    """Base of the GGUF reading errors that ``loading`` re-raises as ``WeightError``."""


# --- tensors ------------------------------------------------------------------------------

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # consumed into RopeConfig.freq_factors
# Tensors llama.cpp's converters may leave in a file that carry nothing fcjax does not
# already compute, each checked rather than trusted (see ``_check_ignored``):
# - ``blk.N.attn_rot_embd``: a stored copy of the rotary inverse frequencies
#   (transformers' ``rotary_emb.inv_freq`` buffer, written by old converters); it is a
#   function of ``rope.freq_base`` and the head size, accepted when it equals the
#   frequencies fcjax computes and refused otherwise.
IGNORED_LAYER_TENSORS = ("attn_rot_embd", "attn_rot_embd.weight")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(name: str) -> str | None:
    """The HF name of a GGUF decoder tensor, or None when it is not one."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    if (m := _LAYER.match(name)) and m.group(2) in LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"
    return None


def _is_ignored(name: str) -> bool:
    return bool((m := _LAYER.match(name)) and m.group(2) in IGNORED_LAYER_TENSORS)


def check_tensor_names(names: list[str], source: str) -> None:
    """Refuses a file holding any tensor fcjax neither uses nor knows to carry nothing."""
    unknown = [n for n in names if hf_name(n) is None and n != ROPE_FREQS and not _is_ignored(n)]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        raise GGUFError(
            f"{source}: {len(unknown)} tensor(s) fcjax does not know how to use: {shown}; "
            "refusing to load a model with parts it would silently drop"
        )


def _tensor_shape(tensor) -> tuple[int, ...]:
    """Torch-layout shape (GGUF lists dimensions fastest-first)."""
    return tuple(int(x) for x in reversed(tensor.shape))


def read_raw(tensor, file) -> np.ndarray:
    """A tensor's stored bytes as a fresh array of its storage layout (F32/F16/BF16 values
    or uint8 blocks ``[rows, bytes per row]``), read from the open ``file`` (not mapped)."""
    file.seek(int(tensor.data_offset))
    raw = np.fromfile(file, dtype=np.uint8, count=int(tensor.n_bytes))
    if raw.size != int(tensor.n_bytes):
        raise GGUFError(f"tensor {tensor.name!r}: file ends inside its data (truncated?)")
    return gguf_index.storage_layout(raw, tensor)


_CHUNK_ELEMENTS = 1 << 22  # rows dequantized at once: bounds the decoder's temporaries


def dequantize(tensor, file=None) -> np.ndarray:
    """One GGUF tensor -> float32 numpy in torch layout. Reads from ``file`` when given
    (else from the reader's mapping); quantized rows are decoded a few MB at a time."""
    from gguf import GGMLQuantizationType as QT
    from gguf import quants

    qtype = QT(tensor.tensor_type)
    shape = _tensor_shape(tensor)
    if file is not None:
        raw = read_raw(tensor, file)
    elif qtype in (QT.F32, QT.F16):
        raw = np.asarray(tensor.data).reshape(shape)
    else:
        raw = np.asarray(tensor.data)
    if qtype == QT.F32:
        return raw if file is not None else np.array(raw, np.float32)
    if qtype == QT.F16:
        return raw.astype(np.float32)
    rows = raw.reshape(-1, raw.shape[-1])
    cols = int(np.prod(shape)) // rows.shape[0]
    out = np.empty((rows.shape[0], cols), np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = quants.dequantize(rows[start : start + step], qtype)
    return out.reshape(shape)


def undo_llama_permutation(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved per head; restore HF's rotate-half order."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_tensors(
    reader, path: str | os.PathLike, config: ModelConfig, source: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Streams ``(hf_name, float32 array in torch layout)`` for every decoder tensor."""
    from fcjax.models.rope import inv_frequencies

    with open(path, "rb") as file:
        for tensor in reader.tensors:
            name = tensor.name
            if name == ROPE_FREQS:
                continue  # already in config.rope.freq_factors
            try:
                array = dequantize(tensor, file)
            except GGUFError as e:
                raise GGUFError(f"{source}: {e}") from None
            except Exception as e:
                raise GGUFError(
                    f"{source}: cannot dequantize tensor {name!r} "
                    f"({getattr(tensor.tensor_type, 'name', tensor.tensor_type)}): {e}"
                ) from None
            if _is_ignored(name):
                _check_ignored(name, array, inv_frequencies(config)[0], source)
                continue
            if config.family == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_heads if "attn_q" in name else config.num_kv_heads
                array = undo_llama_permutation(array, heads)
            yield hf_name(name), array
            del array


def _check_ignored(name: str, array: np.ndarray, inv_freq: np.ndarray, source: str) -> None:
    if array.shape != inv_freq.shape or not np.allclose(array, inv_freq, rtol=1e-5, atol=0):
        raise GGUFError(
            f"{source}: tensor {name!r} (stored rotary frequencies) differs from the "
            "frequencies the metadata implies; refusing a file whose rope fcjax cannot tell"
        )


# --- metadata -----------------------------------------------------------------------------

# tokenizer arrays are decoded by transformers' tokenizer loader, not here
_TOKENIZER_ARRAYS = re.compile(r"^tokenizer\.ggml\.(tokens|scores|token_type|merges|added_tokens)$")


def metadata(reader, source: str) -> dict[str, Any]:
    """Every key/value field of the file, decoded; a field that cannot be decoded is an
    error naming it (never dropped). The vocabulary arrays are reported by length only."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if _TOKENIZER_ARRAYS.match(key):
            meta[key] = range(field.count)
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise GGUFError(
                f"{source}: metadata field {key!r} cannot be decoded ({type(e).__name__}: {e})"
            ) from None
    return meta


# llama.cpp's defaults for keys it reads as optional (llama_model::load_hparams); every other
# key of ``_READ`` that is required there is required here too.
_REQUIRED = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)
_READ = {
    *_REQUIRED,
    "vocab_size",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",  # the older name of rope.scaling.factor
    "rope.scaling.original_context_length",
    "rope.scaling.yarn_beta_fast",
    "rope.scaling.yarn_beta_slow",
    "rope.scaling.yarn_ext_factor",
    "rope.scaling.yarn_attn_factor",
    "rope.scaling.attn_factor",
    "rope.scaling.yarn_log_multiplier",
    "expert_count",
    "expert_used_count",
}
# keys that change nothing at inference
_INERT = {
    "rope.scaling.finetuned",  # a training note
    "pooling_type",  # embedding-model pooling; causal LM logits do not use it
}
_DEFAULTED: set[tuple[str, str]] = set()


def _log_default(source: str, key: str, value: Any, why: str) -> None:
    if (source, key) not in _DEFAULTED:
        _DEFAULTED.add((source, key))
        log.info("%s: GGUF lacks %s; using llama.cpp's default %r (%s)", source, key, value, why)


def _equal_or_absent(value, trivial) -> bool:
    return value is None or math.isclose(float(value), trivial, rel_tol=0, abs_tol=1e-12)


def config_from_metadata(
    meta: Mapping[str, Any],
    tensors: Mapping[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None,
    name: str = "",
    source: str = "",
) -> ModelConfig:
    """Builds a ModelConfig from decoded metadata and the file's tensor shapes
    (``{gguf name: torch-layout shape}``); ``rope_freqs`` is ``rope_freqs.weight``."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    prefix = f"{arch}."
    unknown = sorted(
        k for k in meta if k.startswith(prefix) and k[len(prefix) :] not in _READ | _INERT
    )
    if unknown:
        raise ConfigError(
            f"GGUF metadata keys fcjax does not know ({', '.join(unknown)}) may change the "
            "model's numbers; refusing rather than ignoring them"
        )

    def get(key, default=None, why=None):
        value = meta.get(prefix + key)
        if value is None and why is not None:
            _log_default(source, prefix + key, default, why)
        return default if value is None else value

    missing = [prefix + k for k in _REQUIRED if meta.get(prefix + k) is None]
    if missing:
        raise ConfigError(
            f"GGUF metadata lacks the required field(s) {', '.join(missing)} "
            "(llama.cpp requires them too)"
        )
    if int(get("expert_count", 0)) or int(get("expert_used_count", 0)):
        raise ConfigError(f"{prefix}expert_count: mixture-of-experts models are not supported")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads, "embedding_length / head_count"))
    value_dim = int(get("attention.value_length", hidden // heads, "embedding_length / heads"))
    if value_dim != head_dim:
        raise ConfigError(
            f"{prefix}attention.value_length={value_dim} differs from key_length={head_dim}; "
            "fcjax needs equal key and value head sizes"
        )
    rot = int(get("rope.dimension_count", head_dim, "the whole head (key_length)"))
    if rot != head_dim:
        raise ConfigError(
            f"{prefix}rope.dimension_count={rot} rotates part of each head (key_length="
            f"{head_dim}); partial rotary embeddings are not supported"
        )
    context = int(get("context_length"))
    vocab = get("vocab_size")
    if vocab is None:
        vocab = (
            len(meta.get("tokenizer.ggml.tokens", ())) or tensors.get("token_embd.weight", (0,))[0]
        )
        _log_default(source, prefix + "vocab_size", vocab, "the vocabulary's length")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        family=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads, "head_count")),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope=_rope(get, prefix, context, head_dim, rope_freqs),
        max_position_embeddings=context,
        tie_embeddings="output.weight" not in tensors,
        # biases as the file has them (qwen2 always has q/k/v ones; a missing one is then
        # reported by name), q/k norms as the architecture has them
        qkv_bias=arch == "qwen2" or any(n.endswith(".attn_q.bias") for n in tensors),
        o_bias=any(n.endswith(".attn_output.bias") for n in tensors),
        qk_norm=arch == "qwen3",
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=name,
    )


def _rope(get, prefix: str, context: int, head_dim: int, rope_freqs) -> RopeConfig:
    theta = float(get("rope.freq_base", 10000.0, "llama.cpp's rope_freq_base_train"))
    scaling = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if factor is None:
        factor = get("rope.scale_linear")
    factor = 1.0 if not factor else float(factor)  # llama.cpp: 0 or absent means 1
    if scaling is None:  # llama.cpp's default type is linear (with factor 1: none)
        scaling = "linear"
    rope_type = {"none": "default", "linear": "linear", "yarn": "yarn"}.get(scaling)
    if rope_type is None:
        raise ConfigError(
            f"{prefix}rope.scaling.type={scaling!r} is not supported; supported: none, linear, yarn"
        )
    if rope_type == "linear" and factor == 1.0:
        rope_type = "default"
    for key, trivial in (
        ("rope.scaling.attn_factor", 1.0),
        ("rope.scaling.yarn_attn_factor", 1.0),
        ("rope.scaling.yarn_log_multiplier", 0.0),
    ):
        if not _equal_or_absent(get(key), trivial):
            raise ConfigError(
                f"{prefix}{key}={get(key)} is not supported (llama.cpp versions combine it "
                f"with yarn's magnitude scaling differently); only {trivial} is"
            )
    ext = get("rope.scaling.yarn_ext_factor")
    if ext is not None and float(ext) >= 0 and float(ext) != (1.0 if rope_type == "yarn" else 0.0):
        raise ConfigError(
            f"{prefix}rope.scaling.yarn_ext_factor={ext} is not supported (only yarn's full "
            "ramp, 1.0, or none)"
        )
    orig = None
    if rope_type == "yarn":
        orig = int(get("rope.scaling.original_context_length", context, "context_length"))
    freq_factors = None
    if rope_freqs is not None:
        factors = np.asarray(rope_freqs, np.float32).reshape(-1)
        if factors.shape != (head_dim // 2,):
            raise ConfigError(
                f"{ROPE_FREQS} has {factors.size} entries, expected head size / 2 = {head_dim // 2}"
            )
        if not np.all(np.isfinite(factors)) or np.any(factors <= 0):
            raise ConfigError(f"{ROPE_FREQS} holds non-positive or non-finite divisors")
        freq_factors = tuple(float(x) for x in factors)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)),
        freq_factors=freq_factors,
    )


def reader(path: str | os.PathLike) -> gguf_index.Index:
    """The metadata and tensor index of ``path`` (``gguf_index``; data read on demand)."""
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: file not found")
    try:
        return gguf_index.Index(path)
    except Exception as e:
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


def read_config(rdr, path: str | os.PathLike, name: str = "") -> ModelConfig:
    """The file's ModelConfig, after checking that every tensor is known."""
    source = str(path)
    check_tensor_names([t.name for t in rdr.tensors], source)
    meta = metadata(rdr, source)
    shapes = {t.name: _tensor_shape(t) for t in rdr.tensors}
    freqs = None
    for t in rdr.tensors:
        if t.name == ROPE_FREQS:
            with open(path, "rb") as file:
                freqs = dequantize(t, file)
    return config_from_metadata(meta, shapes, freqs, name=name, source=source)
