"""The one place fcjax reaches into JAX's private modules or version-specific names.

Everything here has no public equivalent in the JAX versions fcjax supports (0.6 to 0.11);
when JAX moves or publishes one, only this module changes.
"""

from __future__ import annotations


def distributed_state():
    """``jax.distributed``'s global state: ``client`` (the coordination service's key-value
    store, None before ``jax.distributed.initialize``), ``process_id``, ``num_processes``.
    Read without starting a backend, which ``jax.process_index()`` would do."""
    from jax._src import distributed

    return distributed.global_state
