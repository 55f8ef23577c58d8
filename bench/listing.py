"""Listing 10,000 objects on the local GCS and S3 emulators: serial walk vs batchscore.

    .venv/bin/python bench/listing.py                  # 10,000 objects in 100 prefixes, both stores
    .venv/bin/python bench/listing.py --objects 2000 --stores gs

For each store it uploads the objects (`images/shard-NNN/img-NNNNN.jpg`), then prints the
seconds for: a plain serial `fs.find` of the prefix; batchscore's listing of the prefix
(first level of prefixes listed in parallel, extension filter, sort); and batchscore's listing
of a CSV manifest of the same URIs, which reads one object instead of listing. The servers
are started here on 127.0.0.1 and stopped by PID.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import fsspec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--prefixes", type=int, default=100)
    parser.add_argument("--stores", nargs="+", default=["gs", "s3"], choices=["gs", "s3"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import emulators

    rows = []
    for scheme in args.stores:
        server = (emulators.start_gcs if scheme == "gs" else emulators.start_s3)()
        os.environ.update(server.env)
        try:
            rows.append((scheme, *measure(scheme, args.objects, args.prefixes)))
        finally:
            server.stop()
    print(f"\nlisting {args.objects} objects in {args.prefixes} prefixes (seconds)")
    print(f"{'store':6} {'upload':>8} {'serial find':>12} {'batchscore dir':>15} {'batchscore manifest':>20}")
    for scheme, upload, serial, ours, manifest in rows:
        print(f"{scheme:6} {upload:8.1f} {serial:12.2f} {ours:15.2f} {manifest:20.2f}")


def measure(scheme: str, objects: int, prefixes: int) -> tuple[float, float, float, float]:
    from batchscore.config import ScoreConfig
    from batchscore.inputs import listing

    fsspec.config.conf.clear()
    fs = fsspec.filesystem(scheme, skip_instance_cache=True)
    bucket = "bench-listing"
    fs.mkdir(bucket)
    names = [f"{bucket}/images/shard-{i % prefixes:03d}/img-{i:05d}.jpg" for i in range(objects)]
    t = time.perf_counter()
    for n in names:  # one at a time: gcp-storage-emulator hangs under many concurrent uploads
        fs.pipe_file(n, b"x")
    upload = time.perf_counter() - t

    fs.invalidate_cache()
    t = time.perf_counter()
    found = fs.find(f"{bucket}/images")
    serial = time.perf_counter() - t
    assert len(found) == objects, len(found)

    fs.invalidate_cache()
    t = time.perf_counter()
    entries = listing.list_inputs(ScoreConfig(input=(f"{scheme}://{bucket}/images/",)))
    ours = time.perf_counter() - t
    assert len(entries) == objects, len(entries)

    fs.pipe_file(f"{bucket}/manifest.csv", ("uri\n" + "\n".join(f"{scheme}://{n}" for n in names)).encode())
    t = time.perf_counter()
    entries = listing.list_inputs(ScoreConfig(input=(f"{scheme}://{bucket}/manifest.csv",)))
    manifest = time.perf_counter() - t
    assert len(entries) == objects
    return upload, serial, ours, manifest


if __name__ == "__main__":
    main()
