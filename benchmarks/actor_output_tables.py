"""What an inference actor's output costs Ray, by how the rows are cut: the two reasons CPU
actors take whole blocks and hand on contiguous tables (pipeline/inference.py).

1. Serialisation: 256 output rows of the trivial model (tests/example_family, an outside model family) as
   Ray Data builds a block from 8-image batches — one table of 32 chunks — against the same
   rows in one chunk, through Ray's serialisation context and through plain pickle 5.
2. Per-call cost: an identity actor over 100,000 {image_id, uri} rows, one actor of ¼ CPU,
   with Ray Data batches of 8, 32 and 256 rows (wall time of the whole run).

    .venv/bin/python -m benchmarks.actor_output_tables [--fixtures build/bench/fixtures-128x128-500]
"""

from __future__ import annotations

import argparse
import pickle
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from rayseg.pipeline.decode import decode_batch
from rayseg.pipeline.inference import EncodedMasks, ImageSegmenter
from rayseg.pipeline.model_spec import ModelSpec

ROWS = 256
MODEL_BATCH = 8
CALL_ROWS = 100_000


def output_batches(fixtures: Path) -> list[pa.Table]:
    """Output rows (OUTPUT_SCHEMA) of the first ROWS images, one table per model batch."""
    paths = sorted(str(p) for p in (fixtures / "images").glob("*.png"))[:ROWS]
    actor = ImageSegmenter(ModelSpec("threshold"), EncodedMasks(), decode=decode_batch, batch_size=MODEL_BATCH)
    batch = {"image_id": np.array([Path(p).name for p in paths], dtype=object), "uri": np.array(paths, dtype=object)}
    return [table for start in range(0, len(paths), MODEL_BATCH) for table in actor({k: v[start : start + MODEL_BATCH] for k, v in batch.items()})]


def seconds_per_call(fn, repeat: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


class Identity:
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return pa.table({"image_id": [str(x) for x in batch["image_id"]], "n": np.arange(len(batch["image_id"]))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", type=Path, default=Path("build/bench/fixtures-128x128-500"))
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    context = ray._private.worker.global_worker.get_serialization_context()

    batches = output_batches(args.fixtures)
    chunked = pa.concat_tables(batches)
    contiguous = chunked.combine_chunks()
    print(f"{chunked.num_rows} output rows, {chunked['segments'].num_chunks} chunks vs 1:")
    for name, table in (("chunked", chunked), ("contiguous", contiguous)):
        ray_ms = seconds_per_call(lambda table=table: context.serialize(table)) * 1e3
        pickle_ms = seconds_per_call(lambda table=table: pickle.dumps(table, protocol=5, buffer_callback=lambda _: None)) * 1e3
        print(f"  {name:10s}: Ray serialisation {ray_ms:.2f} ms, pickle 5 {pickle_ms:.2f} ms")
    print(f"  making it contiguous: {seconds_per_call(lambda: pa.concat_tables(batches).combine_chunks()) * 1e3:.2f} ms")

    table = pa.table({"image_id": [f"{i}.png" for i in range(CALL_ROWS)], "uri": [f"/images/{i}.png" for i in range(CALL_ROWS)]})
    blocks = [table.slice(start, ROWS) for start in range(0, CALL_ROWS, ROWS)]
    print(f"identity actor over {CALL_ROWS} rows in {len(blocks)} blocks:")
    for batch_size in (MODEL_BATCH, MODEL_BATCH, 32, ROWS):  # the first run warms Ray up
        dataset = ray.data.from_blocks(blocks).map_batches(
            Identity, compute=ActorPoolStrategy(min_size=1, max_size=1), batch_size=batch_size, num_cpus=0.25
        )
        started = time.perf_counter()
        rows = sum(len(batch["n"]) for batch in dataset.iter_batches(batch_size=None))
        print(f"  batches of {batch_size:3d}: {time.perf_counter() - started:.2f} s for {rows} rows")
    ray.shutdown()


if __name__ == "__main__":
    main()
