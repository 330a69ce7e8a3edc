"""The benchmark's peer: a transformers model holding fcjax's weights, its batches, its
``generate`` calls and its cache implementations. torch is imported only when called."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import fcjax
from fcjax.models import to_transformers


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def torch_peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def torch_peer(lm: fcjax.LM, dtype: str):
    """A transformers model of lm's architecture holding lm's weights (eval mode)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = to_transformers(lm, dtype, device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _sampling_kwargs(temperature: float) -> dict:
    if temperature > 0:  # top_k=0 / top_p=1: no filtering, as in fcjax's defaults
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def peer_generate_fn(model, batches, new: int, temperature: float, cache: str):
    """transformers ``generate`` over left-padded (ids, mask) batches; returns new ids."""
    import torch

    extra = {"cache_implementation": "static"} if cache == "static" else {}

    def call() -> list[np.ndarray]:
        outs = []
        with torch.inference_mode():
            for ids, mask in batches:
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    eos_token_id=None,
                    pad_token_id=0,
                    **_sampling_kwargs(temperature),
                    **extra,
                )
                outs.append(out[:, ids.shape[1] :])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return [o.cpu().numpy() for o in outs]

    return call


def peer_batches(model, prefixes: Sequence[Sequence[int]], batch: int):
    """Left-padded torch (ids, attention mask) batches of ``batch`` rows."""
    import torch

    out = []
    for start in range(0, len(prefixes), batch):
        part = prefixes[start : start + batch]
        width = max(len(p) for p in part)
        ids = np.zeros((len(part), width), np.int64)
        mask = np.zeros((len(part), width), np.int64)
        for i, p in enumerate(part):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        out.append(
            (torch.as_tensor(ids, device=model.device), torch.as_tensor(mask, device=model.device))
        )
    return out


def peer_caches(model, requested: str, notes: list[str]) -> list[str]:
    """The cache implementations to time: static falls back to dynamic when it fails."""
    caches = ["static", "dynamic"] if requested == "both" else [requested]
    if "static" not in caches:
        return caches
    try:
        peer_generate_fn(model, peer_batches(model, [[5, 6, 7]], 1), 2, 0.0, "static")()
    except Exception as e:
        notes.append(
            f"transformers static cache failed ({type(e).__name__}: {str(e)[:100]}); "
            "timed with the dynamic cache instead"
        )
        caches = list(dict.fromkeys("dynamic" if c == "static" else c for c in caches))
    return caches


def setup_peer(lm: fcjax.LM, notes: list[str], *, peer: str, dtype: str, cache: str, threads: int):
    """The transformers peer (``peer``: "transformers" or "none") and the cache
    implementations to time (``cache``: static, dynamic or both); None, [] without one.
    ``threads`` > 0 sets torch's intra-op threads."""
    if peer != "transformers":
        return None, []
    if not torch_available():
        notes.append("peer skipped: torch/transformers not importable")
        return None, []
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    model = torch_peer(lm, dtype)
    caches = peer_caches(model, cache, notes)
    notes.append(
        f"peer: transformers {transformers_version()} on {model.device} "
        f"({torch.get_num_threads()} threads), same weights"
    )
    if model.device.type != "cpu":
        notes.append("peak GB: each library's own accelerator peak so far (jax, torch.cuda)")
    return model, caches


def chat_peer_fn(
    lm: fcjax.LM,
    prompts: Sequence[Sequence[int]],
    notes: list[str],
    *,
    dtype: str,
    threads: int,
    batch: int,
    new: int,
    temperature: float,
    top_p: float,
    seed: int,
):
    """transformers ``generate`` on chat prompts (batches of ``batch`` rows, dynamic cache)
    until each row's own EOS; the call returns each row's useful length (up to and including
    its EOS), in prompt order. Every
    call reseeds torch with ``seed``, so each draws the same sample: its useful tokens, which
    set its rate, do not change from call to call (fcjax's rows are seeded by example)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    model = to_transformers(lm, dtype)
    batches = peer_batches(model, prompts, batch)
    kwargs = _sampling_kwargs(temperature)
    if temperature > 0:
        kwargs["top_p"] = top_p
    eos = set(lm.eos_token_ids)

    def call() -> list[int]:
        lengths = []
        torch.manual_seed(seed)
        with torch.inference_mode():
            for ids, mask in batches:
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    eos_token_id=sorted(eos),
                    pad_token_id=lm.tokenizer.pad_token_id or 0,
                    **kwargs,
                )[:, ids.shape[1] :].numpy()
                for row in out:
                    hit = [i for i, t in enumerate(row.tolist()) if t in eos]
                    lengths.append(hit[0] + 1 if hit else len(row))
        return lengths

    notes.append(
        f"peer: transformers {transformers_version()} generate, dynamic cache, "
        f"{torch.get_num_threads()} threads"
    )
    return call
