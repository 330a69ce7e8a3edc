"""Weights from HF safetensors directories and GGUF files into a ``Decoder``.

Both sources are read as one stream of ``(hf_name, array in torch layout)`` pairs, one
tensor at a time; ``assemble`` writes each into a preallocated host array of the target
dtype, so peak host memory stays near one copy of the model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fcjax.models.config import ConfigError, ModelConfig, from_gguf_metadata, from_hf_config
from fcjax.models.decoder import Decoder


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
    model = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
    graphdef, state = nnx.split(model)
    return graphdef, {path: var.get_value() for path, var in nnx.to_flat_state(state)}


def assemble(
    config: ModelConfig,
    tensors: Iterator[tuple[str, np.ndarray]],
    dtype,
    source: str,
) -> Decoder:
    """Builds a Decoder from a stream of HF-named torch-layout tensors."""
    dtype = jnp.dtype(dtype)
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype.name)
    graphdef, shapes = abstract_decoder(config, dtype)
    host = {path: np.empty(s.shape, np_dtype) for path, s in shapes.items()}
    filled: set[tuple] = set()
    for name, array in tensors:
        if _IGNORED.search(name):
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
            continue  # tensors fcjax has no use for (e.g. vision towers) are skipped
        if path == ("lm_head",) and config.tie_embeddings:
            continue
        if path not in host:
            raise WeightError(f"{source}: tensor {name!r} is not used by a {config.family} config")
        target = shapes[path].shape
        value = _to_layout(np.asarray(array), kind, target)
        if tuple(value.shape) != tuple(target):
            raise WeightError(
                f"{source}: tensor {name!r} has shape {tuple(np.shape(array))}, but the config "
                f"expects {_expected_torch_shape(kind, target)}"
            )
        host[path][...] = value
        filled.add(path)
        del value, array
    missing: dict[tuple, list[int]] = {}
    for path in shapes:
        if path not in filled:
            key, layer = (path, -1) if path[0] != "blocks" else (path[2:], path[1])
            missing.setdefault(key, []).append(layer)
    if missing:
        names = [_hf_name_of(key, layers) for key, layers in missing.items()]
        raise WeightError(f"{source}: missing weights for {', '.join(names)}")
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, dtype=dtype)))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(host.pop(path)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


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


def iter_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Streams tensors (as float32 numpy) from every safetensors shard, one at a time."""
    from safetensors import safe_open

    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="flax") as f:  # flax: bfloat16 too
                for name in list(f.keys()):
                    yield name, np.asarray(f.get_tensor(name), dtype=np.float32)
        except WeightError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise WeightError(f"{file}: cannot read safetensors ({e})") from None


def load_hf(path: str | os.PathLike, dtype=jnp.float32) -> Decoder:
    path = Path(path)
    config = hf_config(path)
    return assemble(config, iter_safetensors(path), dtype, str(path))


# --- GGUF ----------------------------------------------------------------------------------

_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
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


def gguf_reader(path: str | os.PathLike):
    import gguf

    path = Path(path)
    if not path.exists():
        raise WeightError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise WeightError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {e}"
        ) from None


def gguf_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.model",
        ):
            continue
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    meta["tokenizer.ggml.tokens"] = (
        range(len(reader.fields["tokenizer.ggml.tokens"].data))
        if "tokenizer.ggml.tokens" in reader.fields
        else ()
    )
    return meta


def gguf_config(reader, name: str = "") -> ModelConfig:
    meta = gguf_metadata(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return from_gguf_metadata(meta, has_output, name=name)


def undo_llama_permutation(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved per head; restore HF's rotate-half order."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor -> float32 numpy in torch layout, via the gguf package."""
    from gguf import GGMLQuantizationType, quants

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        data = np.asarray(tensor.data, dtype=np.float32)
    else:
        data = quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    shape = tuple(int(x) for x in reversed(tensor.shape))
    return data.reshape(shape)


def iter_gguf(reader, config: ModelConfig, source: str) -> Iterator[tuple[str, np.ndarray]]:
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GGUF_GLOBAL:
            hf_name = _GGUF_GLOBAL[name]
        elif (m := re.match(r"^blk\.(\d+)\.(.+)$", name)) and m.group(2) in _GGUF_LAYER:
            hf_name = f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"
        else:
            continue
        try:
            array = dequantize(tensor)
        except Exception as e:
            raise WeightError(
                f"{source}: cannot dequantize tensor {name!r} ({tensor.tensor_type.name}): {e}"
            ) from None
        if config.family == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in name else config.num_kv_heads
            array = undo_llama_permutation(array, heads)
        yield hf_name, array


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Decoder, ModelConfig]:
    reader = gguf_reader(path)
    try:
        config = gguf_config(reader, name=Path(path).stem)
    except (KeyError, TypeError) as e:
        raise WeightError(f"{path}: GGUF metadata lacks a required field ({e})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    model = assemble(config, iter_gguf(reader, config, str(path)), dtype, str(path))
    return model, config


def random_decoder(config: ModelConfig, dtype=jnp.float32, seed: int = 0) -> Decoder:
    """A decoder with random weights of ``config``'s shape (benchmarks, presets)."""
    with jax.default_device(jax.devices()[0]):
        return Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed))
