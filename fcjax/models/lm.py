"""``fcjax.load`` and the ``LM`` handle: a decoder's split state, its config and tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.models import loading, registry
from fcjax.models.config import ModelConfig
from fcjax.models.decoder import Decoder
from fcjax.models.presets import PRESETS
from fcjax.text.chat import apply_chat, gguf_tokenizer, load_tokenizer

log = logging.getLogger("fcjax")


@dataclasses.dataclass
class LM:
    """A loaded model: pure state + static graph, ready for jitted functions."""

    graphdef: nnx.GraphDef
    state: nnx.State
    config: ModelConfig
    tokenizer: Any
    name: str
    source: str

    @classmethod
    def from_decoder(cls, model: Decoder, tokenizer=None, name="", source="") -> LM:
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, model.config, tokenizer, name, source)

    @property
    def dtype(self):
        return jax.tree.leaves(self.state)[0].dtype

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    @property
    def decode_attention(self) -> str:
        """The decode attention path (``Numerics.decode_attention``)."""
        return nnx.merge(self.graphdef, self.state).numerics.decode_attention

    def with_decode_attention(self, impl: str) -> LM:
        """The same model decoding with another attention path (``Numerics``): ``xla``,
        ``pallas`` (GPU kernels) or ``pallas_interpret``; the weights are shared."""
        model = nnx.merge(self.graphdef, self.state)
        if model.numerics.decode_attention == impl:
            return self
        model.numerics = dataclasses.replace(model.numerics, decode_attention=impl)
        graphdef, _ = nnx.split(model)
        return dataclasses.replace(self, graphdef=graphdef)

    def chat(self, messages: list[dict]) -> str:
        """Formats messages with the model's chat template (plain format without one)."""
        return apply_chat(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logits(self, ids) -> np.ndarray:
        """ids int [batch, seq] -> float32 logits [batch, seq, vocab]."""
        tokens = _as_batch(ids)
        return np.asarray(_logits(self.graphdef, self.state, tokens))

    def hidden_states(self, ids) -> np.ndarray:
        """ids [batch, seq] -> float32 [layers + 1, batch, seq, embed], as transformers'
        ``output_hidden_states`` (entry 0 the embeddings, the last after the final norm)."""
        tokens = _as_batch(ids)
        return np.asarray(_hidden(self.graphdef, self.state, tokens)).astype(np.float32)


def _as_batch(ids) -> jnp.ndarray:
    tokens = np.asarray(ids, dtype=np.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"ids must be [batch, seq], got shape {tokens.shape}")
    return jnp.asarray(tokens)


# XLA options for every jitted model program. DotMerger (GPU; merges dots that share an
# operand when one is under 32 MB) turned each layer's gate and up projections into one
# product over the two weights concatenated. On an H200 in bfloat16 (qwen2-1.5b shape) at 512
# rows that product went to cuBLAS and the concatenation was a copy every decode step: 28 x
# 55 MB, 0.77 ms of a 13 ms step (at 32 rows a Triton GEMM read both weights in place). Other
# backends ignore the option.
XLA_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=XLA_OPTIONS)
def _logits(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1])
    return model.unembed(model.prefill(tokens, lengths, return_kv=False).normed)


@functools.partial(jax.jit, static_argnums=0, compiler_options=XLA_OPTIONS)
def _hidden(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1])
    return model.prefill(tokens, lengths, capture_all=True, return_kv=False).captured


_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "fp32": jnp.float32,
    "bf16": jnp.bfloat16,
}


def load(name_or_path: str | os.PathLike, dtype: str = "float32", seed: int = 0) -> LM:
    """Loads a model by registry name, local path (HF directory or .gguf), random-weight
    preset (``random:qwen2-1.5b``) or, when online, an HF hub id."""
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    jdtype = _DTYPES[str(dtype)]
    spec = str(name_or_path)
    if spec.startswith("random:") or spec in PRESETS:
        preset = spec.removeprefix("random:")
        if preset not in PRESETS:
            raise registry.RegistryError(
                f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}"
            )
        model = loading.random_decoder(PRESETS[preset], jdtype, seed)
        return LM.from_decoder(model, None, name=f"random:{preset}", source="random")
    if spec in registry.REGISTRY:
        gguf = registry.fetch(spec)
        return _load_gguf(gguf, jdtype, name=spec, tokenizer_cache=gguf.parent / "tokenizer")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, jdtype, name=path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            model = loading.load_hf(path, jdtype)
            return LM.from_decoder(model, _dir_tokenizer(path), name=path.name, source=str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], jdtype, name=path.name)
        raise loading.WeightError(
            f"{path}: neither an HF model directory (config.json + *.safetensors) nor a "
            f"directory with exactly one .gguf file"
        )
    if path.exists():
        raise loading.WeightError(f"{path}: not a .gguf file or a model directory")
    if "/" in spec and not spec.startswith((".", "/", "~")):
        return load(_hub_download(spec), dtype=dtype)
    raise registry.RegistryError(
        f"unknown model {spec!r}: not a registry name ({', '.join(registry.REGISTRY)}), "
        f"a preset (random:{'|'.join(PRESETS)}), or an existing path"
    )


def _load_gguf(path: Path, dtype, name: str, tokenizer_cache: Path | None = None) -> LM:
    model, _ = loading.load_gguf(path, dtype)
    if tokenizer_cache is not None and (tokenizer_cache / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(tokenizer_cache)
    else:
        tokenizer = _gguf_tokenizer(path)
        if tokenizer_cache is not None and tokenizer is not None:
            tokenizer.save_pretrained(str(tokenizer_cache))
    return LM.from_decoder(model, tokenizer, name=name, source=str(path))


def _gguf_tokenizer(path: Path):
    """The GGUF's tokenizer, or None (with a warning) when the file carries no vocabulary
    (the metadata is read once, for the check and the tokenizer)."""
    fields = loading.gguf_reader(path).fields
    if "tokenizer.ggml.tokens" not in fields:
        log.warning("%s has no tokenizer metadata; the model takes token ids only", path)
        return None
    return gguf_tokenizer(path, fields)


def _dir_tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / n).exists() for n in names):
        log.warning("%s has no tokenizer files; the model takes token ids only", path)
        return None
    return load_tokenizer(path)


def _hub_download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        )
    except Exception as e:
        raise registry.RegistryError(
            f"{repo_id!r} looks like a Hugging Face hub id, but it could not be downloaded "
            f"(is the hub reachable?): {type(e).__name__}: {str(e)[:300]}"
        ) from None
