"""Read: listing entries → Ray Dataset of {id, uri}, and a batch function that fetches bytes.

Bytes are fetched inside the CPU task that decodes them (Ray fuses `fetch_bytes` and
`decode.decode_batch`, which share their remote args), so raw bytes never pass through the
object store. A file that cannot be read becomes an error row, not a failed job.
"""

from __future__ import annotations

import numpy as np
import ray

from batchscore import fs as fsutil
from batchscore.listing import Entry

ROWS_PER_BLOCK = 64


def dataset(entries: list[Entry]) -> ray.data.Dataset:
    """A dataset of the listing, split into blocks small enough to spread over the decode tasks."""
    items = [{"id": e.id, "uri": e.uri} for e in entries]
    blocks = max(1, -(-len(items) // ROWS_PER_BLOCK))
    return ray.data.from_items(items, override_num_blocks=blocks)


def fetch_bytes(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds `data` (the file's bytes) and `error` ("" when read, else `read: <reason>`).

    Inside the pipeline "no error" is "", never None: Ray turns an all-None object column
    into floats between stages. Postprocess turns "" into a null `error` in the output.
    """
    data, errors = [], []
    for uri in batch["uri"]:
        try:
            fs, path = fsutil.resolve(str(uri))
            with fs.open(path, "rb") as f:
                data.append(f.read())
            errors.append("")
        except Exception as e:  # noqa: BLE001 - any failure of one file is that row's error
            data.append(b"")
            errors.append(f"read: {type(e).__name__}: {e}")
    batch["data"] = np.array(data, dtype=object)
    batch["error"] = np.array(errors, dtype=object)
    return batch
