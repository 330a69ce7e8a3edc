"""The study's presets build abstract decoders of the published sizes (no weights)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fcjax.models import PRESETS, hf_config_dict
from fcjax.models.config import from_hf_config
from fcjax.models.loading import abstract_decoder

# Parameter counts the model cards publish (billions), for an independent check of the
# shapes: Llama-3.1-8B 8.03, Qwen2.5-Math-7B 7.62, Qwen2.5-14B 14.7, Qwen2.5-32B 32.5
# (QwQ-32B the same), Qwen3-8B 8.2.
PUBLISHED_BILLIONS = {
    "r1-distill-llama-8b": 8.03,
    "r1-distill-qwen-7b": 7.62,
    "r1-distill-qwen-14b": 14.7,
    "r1-distill-qwen-32b": 32.5,
    "qwq-32b": 32.5,
    "qwen3-8b": 8.2,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_study_preset_builds_an_abstract_decoder_of_the_published_size(name):
    config = PRESETS[name]
    _, shapes = abstract_decoder(config, jnp.bfloat16)
    params = sum(int(np.prod(s.shape)) for s in shapes.values())
    assert params / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01), params
    assert all(s.dtype == jnp.bfloat16 for s in shapes.values())
    # the preset is a valid config.json too: exported and read back, it is the same config
    back = from_hf_config(hf_config_dict(config), name=config.name)
    assert back == dataclasses.replace(config, eos_token_ids=back.eos_token_ids)
