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


# --- config.json keys that change numerics: read or refused by name -------------------------


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
        (
            {
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e4},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                }
            },
            "sliding_attention",
        ),
    ],
)
def test_config_key_fcjax_cannot_honour_is_named_with_file(model_copy, changes, named):
    cfg_file = _edit_config(model_copy, **changes)
    with pytest.raises(ConfigError) as err:
        fcjax.load(model_copy)
    assert str(cfg_file) in str(err.value) and named in str(err.value), str(err.value)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny("qwen2-bias", tmp_path_factory.mktemp("qwen2"))


def test_qwen_sliding_window_layers_are_refused(qwen2_dir, tmp_path):
    """transformers' Qwen2 gives layers >= max_window_layers sliding-window attention when
    use_sliding_window is set; fcjax refuses that, and accepts it when no layer is affected."""
    model = Path(shutil.copytree(qwen2_dir, tmp_path / "model"))
    cfg_file = _edit_config(
        model, use_sliding_window=True, sliding_window=16, max_window_layers=1, layer_types=None
    )
    with pytest.raises(ConfigError) as err:
        fcjax.load(model)
    msg = str(err.value)
    assert str(cfg_file) in msg and "max_window_layers=1" in msg and "sliding" in msg
    _edit_config(model, max_window_layers=2)  # both layers below it: full attention only
    assert fcjax.load(model).config.num_layers == 2


def test_config_defaults_follow_transformers_per_family():
    """Keys a config.json omits take transformers' defaults for that family: Qwen3's
    head_dim is 128 (not hidden / heads), Llama's max_position_embeddings 2048, and yarn's
    factor is max_position_embeddings / original_max_position_embeddings."""
    from transformers import AutoConfig

    from fcjax.models.config import from_hf_config

    base = dict(vocab_size=64, hidden_size=512, intermediate_size=64, num_hidden_layers=1)
    base |= dict(num_attention_heads=8, num_key_value_heads=2)
    qwen3 = {"model_type": "qwen3", **base}
    assert from_hf_config(qwen3).head_dim == AutoConfig.for_model(**qwen3).head_dim == 128
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    llama = {"model_type": "llama", **base, "rope_scaling": rope}
    ours = from_hf_config(llama)
    theirs = AutoConfig.for_model(**llama)
    assert ours.max_position_embeddings == theirs.max_position_embeddings == 2048
    want = theirs.rope_parameters["original_max_position_embeddings"]
    assert ours.rope.original_max_position_embeddings == want
    rope = {"rope_type": "yarn", "original_max_position_embeddings": 1024}
    yarn = {"model_type": "qwen2", **base, "max_position_embeddings": 4096, "rope_scaling": rope}
    assert from_hf_config(yarn).rope.factor == 4.0


def test_unknown_config_key_is_logged(model_copy, caplog):
    _edit_config(model_copy, my_new_switch=True)
    with caplog.at_level("WARNING", logger="fcjax"):
        fcjax.load(model_copy)
    assert "my_new_switch" in caplog.text


def test_unknown_tensor_in_safetensors_is_refused_by_name(model_copy):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.gate_proj.bias"] = np.zeros(96, np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"'model\.layers\.0\.mlp\.gate_proj\.bias'"):
        fcjax.load(model_copy)


def test_stored_inv_freq_is_checked(model_copy):
    """A checkpoint's ``rotary_emb.inv_freq`` buffer is accepted when it equals the config's
    frequencies and refused by name when it does not."""
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    inv = (1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    save_file({**tensors, name: inv}, weights, metadata={"format": "pt"})
    fcjax.load(model_copy)
    save_file({**tensors, name: inv * 2}, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=re.escape(repr(name))):
        fcjax.load(model_copy)
