"""Bad models give clear errors: each names the file, tensor or field and the valid options."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import build_tiny

import fcjax
from fcjax.models import ConfigError, RegistryError, WeightError, registry
from fcjax.models.config import SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return build_tiny("llama-gqa-untied", tmp_path_factory.mktemp("llama"))


@pytest.fixture
def model_copy(llama_dir, tmp_path) -> Path:
    """A private copy of the tiny model directory that a test may damage."""
    return Path(shutil.copytree(llama_dir, tmp_path / "model"))


def _edit_config(path: Path, **changes) -> Path:
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))
    return cfg_file


@pytest.mark.parametrize(
    "arch, model_type", [("MistralForCausalLM", "mistral"), ("GPT2LMHeadModel", "gpt2")]
)
def test_unknown_architecture_is_named_with_supported_list(model_copy, arch, model_type):
    cfg_file = _edit_config(model_copy, architectures=[arch], model_type=model_type)
    with pytest.raises(ConfigError) as err:
        fcjax.load(model_copy)
    msg = str(err.value)
    assert arch in msg and str(cfg_file) in msg
    for supported in SUPPORTED_ARCHITECTURES:
        assert supported in msg


def test_unsupported_rope_type_is_named_with_supported_list(model_copy):
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0]}
    cfg_file = _edit_config(model_copy, rope_parameters=rope)
    with pytest.raises(ConfigError) as err:
        fcjax.load(model_copy)
    msg = str(err.value)
    assert "'longrope'" in msg and str(cfg_file) in msg
    for supported in SUPPORTED_ROPE_TYPES:
        assert supported in msg


def test_missing_config_field_is_named(model_copy):
    cfg_file = _edit_config(model_copy, hidden_size=None)
    with pytest.raises(ConfigError, match=re.escape(str(cfg_file)) + ".*'hidden_size'"):
        fcjax.load(model_copy)


def test_invalid_json_config_names_file(model_copy):
    (model_copy / "config.json").write_text('{"architectures": [')
    with pytest.raises(WeightError, match=re.escape(str(model_copy / "config.json"))):
        fcjax.load(model_copy)


def test_truncated_safetensors_names_file(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match=re.escape(str(weights)) + ".*safetensors"):
        fcjax.load(model_copy)


def test_shape_mismatch_names_tensor_and_both_shapes(model_copy):
    _edit_config(model_copy, intermediate_size=128)  # the weights were saved with 96
    with pytest.raises(WeightError) as err:
        fcjax.load(model_copy)
    msg = str(err.value)
    assert str(model_copy) in msg
    # the first MLP tensor read is named, with its file shape and the config's expectation
    m = re.search(r"tensor '(model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight)'", msg)
    assert m, msg
    file_shape = load_file(model_copy / "model.safetensors")[m.group(1)].shape
    assert str(tuple(file_shape)) in msg
    want = tuple(128 if s == 96 else s for s in file_shape)
    assert f"expects {want}" in msg


def test_missing_tensor_is_named(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    dropped = "model.layers.1.self_attn.k_proj.weight"
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError) as err:
        fcjax.load(model_copy)
    msg = str(err.value)
    assert str(model_copy) in msg and "missing" in msg
    assert dropped in msg
    assert "layers.0.self_attn.k_proj" not in msg  # only the dropped layer is reported


def test_missing_lm_head_of_untied_model_is_named(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["lm_head.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"missing.*lm_head\.weight"):
        fcjax.load(model_copy)


def test_unknown_registry_name_lists_known_models():
    with pytest.raises(RegistryError) as err:
        registry.fetch("smollm2-1.7b-nonexistent")
    with pytest.raises(RegistryError) as err_load:
        fcjax.load("smollm2-1.7b-nonexistent")
    for e in (err, err_load):
        assert "'smollm2-1.7b-nonexistent'" in str(e.value)
        for name in registry.REGISTRY:
            assert name in str(e.value)


def test_empty_directory_says_what_is_expected(tmp_path):
    with pytest.raises(WeightError) as err:
        fcjax.load(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "config.json" in msg and ".gguf" in msg


def test_config_without_weights_names_directory(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(WeightError, match=re.escape(str(model_copy)) + r".*no \*\.safetensors"):
        fcjax.load(model_copy)


def test_bad_dtype_lists_valid_ones(llama_dir):
    with pytest.raises(ValueError, match=r"float32.*bfloat16.*'float16'"):
        fcjax.load(llama_dir, dtype="float16")


def _small_gguf(path: Path, arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_vocab_size(16)
    writer.add_tensor("token_embd.weight", np.ones((16, 32), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_gguf_names_file(tmp_path, keep):
    path = _small_gguf(tmp_path / "model.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightError, match=re.escape(str(path)) + ".*GGUF"):
        fcjax.load(path)


def test_not_a_gguf_names_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(WeightError, match=re.escape(str(path)) + ".*GGUF"):
        fcjax.load(path)


def test_gguf_unknown_architecture_is_named(tmp_path):
    path = _small_gguf(tmp_path / "model.gguf", arch="gpt2")
    with pytest.raises(ConfigError) as err:
        fcjax.load(path)
    msg = str(err.value)
    assert str(path) in msg and "'gpt2'" in msg
    for supported in ("llama", "qwen2", "qwen3"):
        assert supported in msg


def test_gguf_missing_metadata_field_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)  # no embedding_length, head_count, ...
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*llama.embedding_length"):
        fcjax.load(path)


def test_hub_id_offline_fails_fast_and_says_why(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # so "org/model" is not a local path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads the variable once, at import; set what it already read too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(RegistryError) as err:
        fcjax.load("org/model")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "'org/model'" in msg and "hub" in msg
