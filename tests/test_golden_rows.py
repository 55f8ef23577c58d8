"""Every row of two real runs against a copy committed from a known-good tree.

The demo digits (classified and embedded from one forward pass, every class kept) and the
vendored decoder corpus (tests/data/decoders: good, damaged and refused files) are scored on
a real local Ray, fp32, and each row's id, labels, probs, error and embedding is compared with
`tests/data/golden/<case>.jsonl`. A refactoring that changes what any row holds fails here.

Ids and errors must be identical; probabilities and embeddings are fp32 results of the same
kernels, compared to 1e-5 (a CPU with other vector units may round the last bit otherwise).

To rewrite the copies (only when a change of rows is intended, said in the commit):
    .venv/bin/python tests/test_golden_rows.py --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden"
CORPUS = HERE / "data" / "decoders"
CASES = ("demo_digits", "decoder_corpus")


def _config(case: str, output: Path):
    from batchscore.config import ScoreConfig
    from batchscore.demo import SAMPLES

    if case == "demo_digits":
        return ScoreConfig(input=(str(SAMPLES),), output=str(output), dtype="fp32", top_k=0, task="classify+embed",
                           progress_seconds=3600)
    return ScoreConfig(input=(str(CORPUS),), output=str(output), dtype="fp32", top_k=3, max_error_fraction=1.0,
                       progress_seconds=3600)


def _rows(case: str, output: Path) -> list[dict]:
    """The run's rows, ids relative to the inputs' folder (the temporary output differs per run)."""
    from batchscore import pipeline
    from batchscore.demo import SAMPLES

    result = pipeline.score(_config(case, output))
    root = str(SAMPLES if case == "demo_digits" else CORPUS)
    rows = []
    for r in result.to_pandas().to_dict("records"):
        row = {"id": str(r["id"]).replace(root, "<root>"), "error": r["error"] if isinstance(r["error"], str) else None,
               "labels": None if r["labels"] is None else [str(x) for x in r["labels"]],
               "probs": _floats(r["probs"])}
        if "embedding" in r:
            row["embedding"] = _floats(r["embedding"])
        rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def _floats(values) -> list[float] | None:
    return None if values is None else [round(float(x), 7) for x in values]


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_every_row_matches_the_committed_copy(ray_session, tmp_path, case):
    want = [json.loads(line) for line in (GOLDEN / f"{case}.jsonl").read_text().splitlines()]
    got = _rows(case, tmp_path / "out")
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        assert g["error"] == w["error"], g["id"]
        assert g["labels"] == w["labels"], g["id"]
        assert _close(g["probs"], w["probs"]), g["id"]
        assert ("embedding" in g) == ("embedding" in w), g["id"]
        if "embedding" in w:
            assert _close(g["embedding"], w["embedding"]), g["id"]
    assert any(r["labels"] for r in want)
    assert case != "decoder_corpus" or any(r["error"] for r in want)  # error rows are compared too


def _write() -> None:
    import ray

    from batchscore.driver.runtime import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False)
    try:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for case in CASES:
            with tempfile.TemporaryDirectory() as d:
                rows = _rows(case, Path(d) / "out")
            (GOLDEN / f"{case}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"{case}: {len(rows)} rows written to {GOLDEN / f'{case}.jsonl'}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (rewrites {GOLDEN}/*.jsonl)")
    _write()
