"""Reading one object: transient failures retried with backoff, permanent ones not."""

from __future__ import annotations

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from batchscore.inputs import read


class FlakyFS(MemoryFileSystem):
    """In-memory files whose opens fail as scripted: a list of exceptions, then success."""

    protocol = "flaky"
    script: list[Exception] = []
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kwargs):
        FlakyFS.opens += 1
        if FlakyFS.script:
            raise FlakyFS.script.pop(0)
        return super()._open(path, mode, **kwargs)


@pytest.fixture()
def flaky(monkeypatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(read, "RETRY_BASE_SECONDS", 0.0)
    FlakyFS().pipe_file("/img.jpg", b"bytes")
    FlakyFS.opens = 0
    yield FlakyFS
    FlakyFS.script = []


def test_transient_errors_are_retried(flaky):
    flaky.script = [ConnectionResetError("reset by peer"), TimeoutError("slow")]
    assert read.fetch("flaky:///img.jpg", retries=3) == (b"bytes", "")
    assert flaky.opens == 3


def test_persistent_transient_error_becomes_an_error_row(flaky):
    flaky.script = [ConnectionResetError("reset")] * 5
    data, error = read.fetch("flaky:///img.jpg", retries=3)
    assert data == b"" and error == "read.failed: failed after 3 attempts: ConnectionResetError: reset"
    assert flaky.opens == 3


@pytest.mark.parametrize("exc, code", [(FileNotFoundError("gone"), "read.not_found"),
                                       (PermissionError("403 Forbidden"), "read.forbidden")])
def test_missing_and_forbidden_are_not_retried(flaky, exc, code):
    flaky.script = [exc]
    data, error = read.fetch("flaky:///img.jpg", retries=3)
    assert error == f"{code}: {type(exc).__name__}: {exc}" and flaky.opens == 1


def test_backoff_grows(monkeypatch, flaky):
    sleeps = []
    monkeypatch.setattr(read, "RETRY_BASE_SECONDS", 0.5)
    monkeypatch.setattr(read.time, "sleep", sleeps.append)
    flaky.script = [OSError("503 Slow Down")] * 3
    read.fetch("flaky:///img.jpg", retries=3)
    assert sleeps == [0.5, 1.0]


def test_ids_are_unique_within_a_container(tmp_path):
    """A Parquet id column that repeats a value: the later row is an error row with its own
    id `<file>#<row>` (never two rows under one id); a request file's repeated index gets `~2`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [b"a", b"b", b"c"], "key": ["k1", "k2", "k1"]}), path)
    rows = list(read.read_parquet(str(path), read.ReadOptions(id_column="key")))
    assert [r[0] for r in rows] == ["k1", "k2", f"{path}#2"]
    assert rows[2][2] == "read.bad_id: id 'k1' in column 'key' repeats row 0 of this file" and rows[2][1] == b"c"
    request = tmp_path / "r.json"
    request.write_text(json.dumps({"input_data": {"columns": ["image"], "index": [7, 7], "data": [["eA=="], ["eQ=="]]}}))
    assert [r[0] for r in read.read_azureml(str(request), read.ReadOptions())] == [f"{request}#7", f"{request}#7~2"]
