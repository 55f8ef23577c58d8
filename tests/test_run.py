"""The driver's row accounting (`run.Coverage`, `run.check_rows`) against a plain set model."""

from __future__ import annotations

import random

import pytest

from batchscore.driver import run
from batchscore.exceptions import SinkError
from batchscore.inputs.listing import Entry, Listing
from batchscore.outputs import write


def files(n: int) -> Listing:
    return Listing.of([Entry(id=f"/x/{i}.jpg", uri=f"/x/{i}.jpg") for i in range(n)])


@pytest.mark.parametrize("seed", range(20))
def test_coverage_merges_ranges_and_counts_overlaps_like_a_set(seed):
    rng = random.Random(seed)
    cov, seen, duplicates = run.Coverage(), set(), 0
    for _ in range(rng.randint(1, 40)):
        a = rng.randint(0, 200)
        b = a + rng.randint(1, 30)
        duplicates += len(seen & set(range(a, b)))
        seen |= set(range(a, b))
        cov.add_range(a, b)
    assert cov.duplicates == duplicates and cov.files() == len(seen)
    assert all(cov.covers(i) == (i in seen) for i in range(-1, 240))
    assert all(s < e for s, e in zip(cov.starts, cov.ends))
    assert all(e < s for e, s in zip(cov.ends, cov.starts[1:]))  # disjoint, not even touching


def test_parts_in_any_order_prove_one_row_per_file_and_catch_loss_and_duplicates():
    entries = files(10)
    parts = [{"files": write.ranges(list(r)), "containers": {}, "duplicates": 0} for r in
             (range(5, 10), range(0, 3), range(3, 5))]
    cov = run.Coverage()
    for p in parts:
        cov.add(p)
    run.check_rows(entries, cov, 10)
    lost = run.Coverage()
    for p in parts[:2]:
        lost.add(p)
    with pytest.raises(SinkError, match=r"2 input\(s\) gave no row, e.g. \['/x/3.jpg', '/x/4.jpg'\]"):
        run.check_rows(entries, lost, 8)
    twice = run.Coverage()
    for p in parts + parts[1:2]:
        twice.add(p)  # a part counted twice (or written twice under two names)
    with pytest.raises(SinkError, match="3 duplicate rows"):
        run.check_rows(entries, twice, 13)


def test_containers_must_hold_what_they_announced():
    entries = Listing.of([Entry(id="s0.tar", uri="s0.tar", kind="tar", rows=None),
                          Entry(id="p.parquet", uri="p.parquet", kind="parquet", rows=4)])
    cov = run.Coverage()
    cov.add({"files": [], "containers": {"0": [2, None], "1": [4, None]}, "duplicates": 0})
    cov.add({"files": [], "containers": {"0": [1, 3]}, "duplicates": 0})  # the shard's last row: 3 in all
    run.check_rows(entries, cov, 7)
    short = run.Coverage()
    short.add({"files": [], "containers": {"0": [2, 3], "1": [3, None]}, "duplicates": 0})
    with pytest.raises(SinkError, match=r"wrong number of rows .*\('s0.tar', 2, 3\), \('p.parquet', 3, 4\)"):
        run.check_rows(entries, short, 5)
