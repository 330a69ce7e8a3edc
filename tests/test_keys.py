"""Row keys: 64-bit example keys, every bit of which reaches the row's random stream."""

import hashlib

import jax
import numpy as np
import pytest

from fcjax.engine.sampling import row_ident, row_keys
from fcjax.keys import key_words, stable_key
from fcjax.text import select_steps


def test_stable_key_is_64_bits_and_integers_are_their_own_key():
    digest = hashlib.sha256(b"gsm8k-0001").digest()
    assert stable_key("gsm8k-0001") == int.from_bytes(digest[:8], "little")
    assert stable_key(7) == 7 and stable_key(np.int64(7)) == 7
    assert stable_key(2**63 + 5) == 2**63 + 5
    assert stable_key(-1) == int.from_bytes(hashlib.sha256(b"-1").digest()[:8], "little")
    # ids that the old 31-bit hash could not tell apart keep distinct keys
    many = {stable_key(f"row-{i}") for i in range(200_000)}
    assert len(many) == 200_000 and max(many) >= 2**32
    assert key_words(2**40 + 3) == (3, 2**8)
    with pytest.raises(ValueError, match="64-bit"):
        key_words(2**64)


def test_keys_differing_only_beyond_31_bits_give_different_streams():
    seed = 0
    base = row_ident(5, 0, 0)
    for high in (2**31 + 5, 2**32 + 5, 2**63 + 5):  # the same low 31 bits as 5
        idents = np.asarray([base, row_ident(high, 0, 0)], np.uint32)
        a, b = np.asarray(row_keys(seed, idents))
        assert not np.array_equal(a, b)
        draws = jax.vmap(lambda k: jax.random.uniform(k, (64,)))(row_keys(seed, idents))
        assert not np.allclose(draws[0], draws[1])
    # the same ident and seed: the same key; another seed: another key
    again = np.asarray(row_keys(seed, np.asarray([base], np.uint32)))[0]
    assert np.array_equal(again, np.asarray(row_keys(seed, np.asarray([base], np.uint32)))[0])
    other = np.asarray(row_keys(1, np.asarray([base], np.uint32)))[0]
    assert not np.array_equal(again, other)
    # cut and sample words matter too
    idents = np.asarray([row_ident(5, 1, 0), row_ident(5, 0, 1), base], np.uint32)
    assert len({tuple(k) for k in np.asarray(row_keys(seed, idents)).tolist()}) == 3


def test_select_steps_uses_the_shared_key():
    picked = select_steps(50, max_steps=6, seed=3, key="ex-9")
    rng = np.random.default_rng([3, stable_key("ex-9")])
    middle = rng.choice(np.arange(1, 49), size=4, replace=False)
    assert picked == sorted([0, 49, *middle.tolist()])
