"""Listing a directory of 100k image files (issue 25): wall time and driver memory of the
fs.find listing (before) and the streamed one (after), at 10k and 100k files.

    .venv/bin/python -m benchmarks.listing [--sizes 10000 100000] [--workdir build/listing]

Each tree is hard links (`os.link`) to 256 tiny PNGs, made once and kept: `nested`
spreads the files over 10 × 10 subdirectories, `flat` puts them all in one. Every figure
comes from its own fresh process, after a warm-up listing so the kernel's dentry cache is
equally warm for both, and after one listing of the 256 sources (lazy imports and
first-call caches are no listing's cost): wall time of `list_images` and of `open_source`, the peak RSS
growth over the process before the call (getrusage), Arrow's peak allocation, and — in a
second process, since tracing inflates time and RSS — tracemalloc's peak of Python
allocations.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import psutil

SOURCES = 256
LAYOUTS = ("nested", "flat")
METHODS = ("find", "stream")


def find_listing(input_uri: str):
    """list_images as it was before issue 25: one fs.find of the whole tree, then Python lists."""
    import pyarrow as pa

    from rayseg.pipeline import sources
    from rayseg.pipeline.storage import filesystem, full_uri

    fs, root = filesystem(input_uri)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    paths = sorted(path for path in found if posixpath.splitext(path)[1].lower() in sources.IMAGE_EXTENSIONS)
    ids, uris, errors = [], [], []
    for path in paths:
        image_id, uri = posixpath.relpath(path, root), full_uri(fs, path)
        if sources._utf8(uri):
            errors.append(None)
        else:
            image_id, uri = sources._escaped(image_id), sources._escaped(uri)
            errors.append(f"file name is not valid UTF-8: {uri}")
        ids.append(image_id)
        uris.append(uri)
    return pa.table({"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string()), "error": pa.array(errors, pa.string())})


def make_tree(workdir: Path, layout: str, files: int) -> Path:
    """`files` hard links to SOURCES tiny PNGs (and a .txt per directory, skipped by the
    listing), made once: a `done` marker says the tree is whole."""
    root = workdir / f"{layout}-{files}"
    if (root.parent / f"{root.name}.done").exists():
        return root
    sources = workdir / "sources"
    if not sources.exists():
        from PIL import Image

        sources.mkdir(parents=True)
        for i in range(SOURCES):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 255 - i, i // 2)).save(buffer, format="PNG")
            (sources / f"{i}.png").write_bytes(buffer.getvalue())
    directories = [root] if layout == "flat" else [root / f"d{a}" / f"e{b}" for a in range(10) for b in range(10)]
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "notes.txt").write_text("not an image")
    for i in range(files):
        os.link(sources / f"{i % SOURCES}.png", directories[i % len(directories)] / f"img{i:07d}.png")
    (root.parent / f"{root.name}.done").touch()
    return root


def measure(method: str, call: str, root: str, trace: bool) -> dict:
    """One listing, measured in this (fresh) process."""
    import pyarrow as pa

    from rayseg.pipeline import sources

    if method == "find":
        sources.list_images = lambda uri, storage_options=None: find_listing(uri)  # open_source's too
    function = sources.list_images if call == "list_images" else sources.open_source
    function(str(Path(root).parent / "sources"))  # lazy imports and first-call caches, not the listing's cost
    before = psutil.Process().memory_info().rss
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    result = function(root)
    wall = time.perf_counter() - started
    python_peak = tracemalloc.get_traced_memory()[1] if trace else None
    arrow_peak = pa.default_memory_pool().max_memory()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    table = result if call == "list_images" else result.table
    return {
        "wall_s": wall,
        "rss_growth": rss_peak - before,
        "arrow_peak": arrow_peak,
        "python_peak": python_peak,
        "rows": table.num_rows,
        "first": table["image_id"][0].as_py(),
        "last": table["image_id"][-1].as_py(),
    }


def in_subprocess(method: str, call: str, root: Path, trace: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.listing", "--measure", method, call, str(root)] + (["--trace"] if trace else [])
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=Path("build/listing"))
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "CALL", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, trace=args.trace)))
        return
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    rows = []
    for files in args.sizes:
        for layout in LAYOUTS:
            root = make_tree(args.workdir, layout, files)
            in_subprocess("stream", "list_images", root, False)  # warms the dentry cache
            for method in METHODS:
                listed = in_subprocess(method, "list_images", root, False)
                traced = in_subprocess(method, "list_images", root, True)
                opened = in_subprocess(method, "open_source", root, False)
                assert listed["rows"] == files, listed
                row = {"files": files, "layout": layout, "method": method, **listed, "open_source_s": opened["wall_s"], "python_peak": traced["python_peak"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            find, stream = rows[-2], rows[-1]
            assert (find["first"], find["last"]) == (stream["first"], stream["last"]), "the listings differ"
    print(f"load average at end: {os.getloadavg()}", file=sys.stderr)
    print("| files | layout | listing | list_images | open_source | Python peak (tracemalloc) | RSS growth | Arrow peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['files']:,} | {r['layout']} | {'fs.find (before)' if r['method'] == 'find' else 'streamed (after)'} "
            f"| {r['wall_s']:.2f} s | {r['open_source_s']:.2f} s | {mib(r['python_peak'])} | {mib(r['rss_growth'])} | {mib(r['arrow_peak'])} |"
        )


if __name__ == "__main__":
    main()
