"""Weights from HF safetensors directories and GGUF files into a ``Decoder``.

Both sources are read as one stream of ``(hf_name, array in torch layout)`` pairs, one
tensor at a time, with plain file reads; ``assemble`` converts each to the target dtype and
places it on the device as it arrives, so peak host memory stays near one copy of the
model plus one tensor (``tests/test_load_memory.py`` measures it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fcjax.models import gguf_file
from fcjax.models.config import ConfigError, ModelConfig, from_hf_config
from fcjax.models.decoder import Decoder, shaped


class WeightError(ValueError):
    """Weights that cannot be read or do not match the config; names the file or tensor."""


# --- HF tensor names -> (decoder param path, how to reshape the torch-layout tensor) -------

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GLOBAL = {
    "model.embed_tokens.weight": (("embed",), "same"),
    "model.norm.weight": (("final_norm", "scale"), "same"),
    "lm_head.weight": (("lm_head",), "transpose"),
}
_PER_LAYER = {
    "input_layernorm.weight": (("attn_norm", "scale"), "same"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), "same"),
    "self_attn.q_proj.weight": (("attn", "q"), "in_proj"),
    "self_attn.k_proj.weight": (("attn", "k"), "in_proj"),
    "self_attn.v_proj.weight": (("attn", "v"), "in_proj"),
    "self_attn.o_proj.weight": (("attn", "o"), "out_proj"),
    "self_attn.q_proj.bias": (("attn", "q_bias"), "bias"),
    "self_attn.k_proj.bias": (("attn", "k_bias"), "bias"),
    "self_attn.v_proj.bias": (("attn", "v_bias"), "bias"),
    "self_attn.o_proj.bias": (("attn", "o_bias"), "same"),
    "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), "same"),
    "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), "same"),
    "mlp.gate_proj.weight": (("mlp", "gate"), "transpose"),
    "mlp.up_proj.weight": (("mlp", "up"), "transpose"),
    "mlp.down_proj.weight": (("mlp", "down"), "transpose"),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _to_layout(array: np.ndarray, kind: str, target: tuple[int, ...]) -> np.ndarray:
    """Torch-layout tensor -> decoder layout of shape ``target`` (one layer's slice)."""
    if kind == "same":
        return array.reshape(target) if array.size == np.prod(target) else array
    if kind == "transpose":
        return array.T
    if kind == "in_proj":  # [heads*hd, embed] -> [embed, heads, hd]
        d, n, h = target
        return array.reshape(n, h, d).transpose(2, 0, 1) if array.shape == (n * h, d) else array
    if kind == "out_proj":  # [embed, heads*hd] -> [heads, hd, embed]
        n, h, d = target
        return array.reshape(d, n, h).transpose(1, 2, 0) if array.shape == (d, n * h) else array
    if kind == "bias":  # [heads*hd] -> [heads, hd]
        return array.reshape(target) if array.size == np.prod(target) else array
    raise AssertionError(kind)


def _to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of ``_to_layout``: one decoder-layout tensor -> torch layout."""
    if kind == "transpose":
        return array.T
    if kind == "in_proj":  # [embed, heads, hd] -> [heads*hd, embed]
        d, n, h = array.shape
        return array.transpose(1, 2, 0).reshape(n * h, d)
    if kind == "out_proj":  # [heads, hd, embed] -> [embed, heads*hd]
        n, h, d = array.shape
        return array.transpose(2, 0, 1).reshape(d, n * h)
    if kind == "bias":  # [heads, hd] -> [heads*hd]
        return array.reshape(-1)
    if kind == "same":
        return array
    raise AssertionError(kind)


def iter_hf_tensors(config: ModelConfig, state) -> Iterator[tuple[str, np.ndarray]]:
    """The inverse of ``assemble``: a decoder state's weights as ``(hf_name, float32 array in
    torch layout)``, one tensor at a time (``lm_head.weight`` too when embeddings are tied)."""
    by_path = {path: (name, kind) for name, (path, kind) in _GLOBAL.items()}
    per_layer = {path: (name, kind) for name, (path, kind) in _PER_LAYER.items()}
    for path, var in nnx.to_flat_state(state):
        value = np.asarray(jax.device_get(var.get_value()), np.float32)
        if path in by_path:
            name, kind = by_path[path]
            yield name, _to_torch(value, kind)
            if path == ("embed",) and config.tie_embeddings:
                yield "lm_head.weight", value
        else:  # ("blocks", layer, ...)
            suffix, kind = per_layer[path[2:]]
            yield f"model.layers.{path[1]}.{suffix}", _to_torch(value, kind)
    if config.family != "qwen2" and config.qkv_bias and not config.o_bias:
        # transformers' attention_bias also gives o_proj a bias; this config has none
        for layer in range(config.num_layers):
            yield (
                f"model.layers.{layer}.self_attn.o_proj.bias",
                np.zeros(config.hidden_size, np.float32),
            )


def abstract_decoder(config: ModelConfig, dtype) -> tuple[nnx.GraphDef, dict]:
    """GraphDef and {path: ShapeDtypeStruct} of a decoder, without allocating it."""
    graphdef, state = nnx.split(shaped(config, dtype))
    return graphdef, {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def assemble(
    config: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    dtype,
    source: str,
) -> Decoder:
    """Builds a Decoder from a stream of HF-named torch-layout tensors.

    Each tensor is converted and placed on the default device as it arrives, so the host
    holds one tensor at a time next to the placed model (no staged host copy of it all).
    A tensor the decoder has no place for is refused by name."""
    dtype = jnp.dtype(dtype)
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype.name)
    graphdef, state = nnx.split(shaped(config, dtype))
    flat = nnx.to_flat_state(state)
    shapes = {path: var.get_value() for path, var in flat}
    placed: dict[tuple, jax.Array] = {}
    for name, array in tensors:
        if _IGNORED.search(name):
            _check_inv_freq(config, name, array, source)
            continue
        if name in _GLOBAL:
            path, kind = _GLOBAL[name]
        elif (m := _LAYER.match(name)) and m.group(2) in _PER_LAYER:
            layer = int(m.group(1))
            if layer >= config.num_layers:
                raise WeightError(
                    f"{source}: tensor {name!r} is for layer {layer}, but the config has "
                    f"{config.num_layers} layers"
                )
            sub, kind = _PER_LAYER[m.group(2)]
            path = ("blocks", layer, *sub)
        else:
            raise WeightError(
                f"{source}: tensor {name!r} is not part of a {config.family} decoder; refusing "
                "to load a model with parts it would silently drop"
            )
        if path == ("lm_head",) and config.tie_embeddings:
            continue  # transformers writes the tied head too; it is the embedding
        if path not in shapes:
            raise WeightError(f"{source}: tensor {name!r} is not used by a {config.family} config")
        if path in placed:
            raise WeightError(f"{source}: tensor {name!r} appears more than once")
        target = shapes[path].shape
        value = _to_layout(np.asarray(array), kind, target)
        if tuple(value.shape) != tuple(target):
            raise WeightError(
                f"{source}: tensor {name!r} has shape {tuple(np.shape(array))}, but the config "
                f"expects {_expected_torch_shape(kind, target)}"
            )
        host = np.ascontiguousarray(value, dtype=np_dtype)  # a copy only when needed
        del value, array  # before placing: at most two copies of one tensor at a time
        placed[path] = jax.device_put(host)
        del host
    missing: dict[tuple, list[int]] = {}
    for path in shapes:
        if path not in placed:
            key, layer = (path, -1) if path[0] != "blocks" else (path[2:], path[1])
            missing.setdefault(key, []).append(layer)
    if missing:
        names = [_hf_name_of(key, layers) for key, layers in missing.items()]
        raise WeightError(f"{source}: missing weights for {', '.join(names)}")
    for path, var in flat:
        var.set_value(placed.pop(path))
    _release_free_heap()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _release_free_heap() -> None:
    """Hands the heap pages freed by the per-tensor conversions back to the OS (glibc keeps
    them otherwise, and they count as resident); a no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _check_inv_freq(config: ModelConfig, name: str, array, source: str) -> None:
    """A stored ``rotary_emb.inv_freq`` buffer carries nothing fcjax does not compute; it is
    accepted only when it equals the frequencies the config gives."""
    from fcjax.models.rope import inv_frequencies

    want = inv_frequencies(config)[0]
    got = np.asarray(array, np.float32).reshape(-1)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=0):
        raise WeightError(
            f"{source}: tensor {name!r} (stored rotary frequencies) differs from the "
            "frequencies the config implies; refusing a model whose rope fcjax cannot tell"
        )


def _hf_name_of(path: tuple[str, ...], layers: list[int]) -> str:
    """The HF tensor name(s) behind a decoder param path (a layer's path without its
    ``blocks, N`` prefix), for error messages."""
    if layers == [-1]:
        return next(name for name, (p, _) in _GLOBAL.items() if p == path)
    suffix = next(name for name, (p, _) in _PER_LAYER.items() if p == path)
    if len(layers) == 1:
        return f"model.layers.{layers[0]}.{suffix}"
    shown = ", ".join(map(str, layers[:5])) + (", ..." if len(layers) > 5 else "")
    return f"model.layers.N.{suffix} (N = {shown})"


def _expected_torch_shape(kind: str, target: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "transpose":
        return tuple(reversed(target))
    if kind == "in_proj":
        d, n, h = target
        return (n * h, d)
    if kind == "out_proj":
        n, h, d = target
        return (d, n * h)
    if kind == "bias":
        return (int(np.prod(target)),)
    return tuple(target)


# --- HF safetensors directories -----------------------------------------------------------


def hf_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise WeightError(f"{path}: no config.json (expected an HF model directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        return from_hf_config(cfg, name=path.name)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{cfg_file}: missing required field {e}") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightError(f"{path}: no *.safetensors weights found")
    for f in files:
        if not f.exists():
            raise WeightError(f"{index}: lists {f.name}, which does not exist")
    return files


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
}


def iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Streams tensors (as float32 numpy) from every safetensors shard, one at a time.

    The format (8-byte header length, JSON header, raw little-endian data) is read with
    plain file reads, not a memory map: a map's touched pages would stay resident until
    the whole shard is done, doubling the host memory a load needs."""
    for file in safetensors_files(path):
        with open(file, "rb") as f:
            header, data_start = _safetensors_header(f, file)
            size = os.fstat(f.fileno()).st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype = _ST_DTYPES.get(info.get("dtype"))
                if dtype is None:
                    raise WeightError(
                        f"{file}: tensor {name!r} has dtype {info.get('dtype')!r}; supported: "
                        f"{', '.join(_ST_DTYPES)}"
                    )
                begin, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(x) for x in info["shape"])
                count = (end - begin) // np.dtype(dtype).itemsize
                if data_start + end > size or count != int(np.prod(shape)):
                    raise WeightError(
                        f"{file}: cannot read safetensors tensor {name!r} (file truncated or "
                        "header inconsistent)"
                    )
                f.seek(data_start + begin)
                array = np.fromfile(f, dtype=dtype, count=count).reshape(shape)
                yield name, array if dtype == np.float32 else array.astype(np.float32)
                del array


def _safetensors_header(f, file: Path) -> tuple[dict, int]:
    try:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > os.fstat(f.fileno()).st_size:
            raise ValueError(f"header length {length} exceeds the file")
        header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise WeightError(f"{file}: cannot read safetensors ({e})") from None
    return header, 8 + length


def load_hf(path: str | os.PathLike, dtype=jnp.float32) -> Decoder:
    path = Path(path)
    config = hf_config(path)
    return assemble(config, iter_safetensors(path), dtype, str(path))


# --- GGUF ----------------------------------------------------------------------------------


def gguf_reader(path: str | os.PathLike):
    try:
        return gguf_file.reader(path)
    except gguf_file.GGUFError as e:
        raise WeightError(str(e)) from None


def gguf_config(reader, path: str | os.PathLike, name: str = "") -> ModelConfig:
    try:
        return gguf_file.read_config(reader, path, name=name)
    except gguf_file.GGUFError as e:
        raise WeightError(str(e)) from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def iter_gguf(reader, path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Streams a GGUF's decoder tensors as ``(hf_name, float32 torch-layout array)``."""
    try:
        yield from gguf_file.iter_tensors(reader, path, config, str(path))
    except gguf_file.GGUFError as e:
        raise WeightError(str(e)) from None


dequantize = gguf_file.dequantize
undo_llama_permutation = gguf_file.undo_llama_permutation


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Decoder, ModelConfig]:
    reader = gguf_reader(path)
    config = gguf_config(reader, path, name=Path(path).stem)
    model = assemble(config, iter_gguf(reader, path, config), dtype, str(path))
    return model, config


def random_decoder(config: ModelConfig, dtype=jnp.float32, seed: int = 0) -> Decoder:
    """A decoder with random weights of ``config``'s shape (benchmarks, presets)."""
    with jax.default_device(jax.devices()[0]):
        return Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed))
