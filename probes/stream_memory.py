"""Peak memory and time of probe training: streamed from a TensorStore dump vs in memory.

    python -m probes.stream_memory make --dump=DIR --rows=60000 [--layers=31 --width=576]
    python -m probes.stream_memory stream --dump=DIR [--epochs=2 --batch=4096]
    python -m probes.stream_memory memory --dump=DIR [--epochs=2]

``make`` writes random step-end states (float32) with random labels in blocks; ``stream``
trains every layer's linear probe with ``probes.trainer.fit`` reading minibatches from the
store; ``memory`` reads the whole dump (``HiddenReader.read``) and trains full-batch with
``probes.trainer.fit`` on an in-memory source, as the stage did before streaming. Each mode
prints one JSON line with wall time and peak RSS (``ru_maxrss``); run each in its own
process so the peaks do not mix.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("dump", None, "dump directory", required=True)
    flags.DEFINE_integer("rows", 60000, "rows (make)")
    flags.DEFINE_integer("layers", 31, "layers (make)")
    flags.DEFINE_integer("width", 576, "hidden width (make)")
    flags.DEFINE_integer("epochs", 2, "training epochs")
    flags.DEFINE_integer("batch", 4096, "streamed rows per step")
    flags.DEFINE_integer("first", 0, "memory mode: read only the first rows (0: all)")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _labels(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.random(n) < 0.5).astype(np.float64), np.ones(n, np.float32)


def make() -> dict:
    from fcjax.store.hidden import HiddenStore

    rng = np.random.default_rng(1)
    store = HiddenStore(FLAGS.dump, list(range(FLAGS.layers)), FLAGS.width, "float32")
    step, per = 1024, 4  # rows per block, steps per question
    for lo in range(0, FLAGS.rows, step):
        n = min(step, FLAGS.rows - lo)
        block = rng.standard_normal((n, FLAGS.layers, FLAGS.width), np.float32)
        for i in range(0, n, per):
            rows = block[i : i + per]
            store.write(f"q{(lo + i) // per}", list(range(len(rows))), rows)
        store.flush()
    rows = store.finalize()
    gb = rows * FLAGS.layers * FLAGS.width * 4 / 1e9
    return {"mode": "make", "rows": rows, "gb_float32": gb}


def train(streamed: bool) -> dict:
    from fcjax.store.hidden import HiddenReader
    from probes.sources import ArraySource, StoreSource
    from probes.trainer import TrainConfig, fit

    t0 = time.perf_counter()
    reader = HiddenReader(FLAGS.dump)
    if streamed:
        source = StoreSource(reader)
        config = TrainConfig(epochs=FLAGS.epochs, batch_size=FLAGS.batch)
    else:
        rows = reader.index["row"][: FLAGS.first or None]
        source = ArraySource(reader.read_rows(rows))
        config = TrainConfig(epochs=FLAGS.epochs)
    t_read = time.perf_counter() - t0
    y, w = _labels(source.n_rows)
    result = fit(source, y, w, config=config, weight_decay=np.full(source.n_layers, 1e-2))
    np.asarray(result.params["w"]).sum()
    return {
        "mode": "stream" if streamed else "memory",
        "rows": source.n_rows,
        "layers": source.n_layers,
        "width": source.width,
        "gb_float32": source.n_rows * source.n_layers * source.width * 4 / 1e9,
        "epochs": FLAGS.epochs,
        "batch": FLAGS.batch if streamed else source.n_rows,
        "read_s": t_read,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": _peak_mb(),
    }


def main(argv):
    mode = argv[1] if len(argv) > 1 else ""
    if mode == "make":
        out = make()
    elif mode in ("stream", "memory"):
        out = train(mode == "stream")
    else:
        sys.exit("mode: make | stream | memory")
    print(json.dumps(out))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
