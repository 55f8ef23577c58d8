"""The commit protocol on a real directory: `_SUCCESS` is the single commit point."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchscore import sink


def run(output, run_id: str, ids: list[str]) -> sink.StagedWriter:
    writer = sink.StagedWriter(str(output), run_id, {"model": "m@sha256:0", "run_id": run_id}, rows_per_file=2)
    writer.write(pa.table({"id": ids, "source": ids, "labels": [["a"]] * len(ids), "probs": [[1.0]] * len(ids),
                           "error": [None] * len(ids), "error_code": [None] * len(ids)}))
    writer.close()
    return writer


def manifest(writer: sink.StagedWriter) -> dict:
    return {"run_id": writer.run_id, "files": [p.__dict__ for p in writer.parts]}


def test_overwrite_crash_before_the_commit_point_keeps_the_old_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = run(out, "run-old", ["x", "y", "z"])
    sink.commit(old, manifest(old))
    assert sorted(sink.read_committed(str(out)).column("id").to_pylist()) == ["x", "y", "z"]

    new = run(out, "run-new", ["p", "q"])
    real = type(new.fs).pipe_file

    def crash_on_success(self, path, *args, **kwargs):
        if path.endswith("/_SUCCESS"):
            raise OSError("driver died here")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(new.fs), "pipe_file", crash_on_success)
    with pytest.raises(OSError, match="driver died here"):
        sink.commit(new, manifest(new))
    monkeypatch.undo()
    # The new parts and manifests are in place, but _SUCCESS still names the old run: readers
    # see exactly the old run, all of it.
    assert json.loads((out / "_manifest.json").read_text())["run_id"] == "run-new"
    assert sink.read_manifest(str(out))["run_id"] == "run-old"
    assert sorted(sink.read_committed(str(out)).column("id").to_pylist()) == ["x", "y", "z"]

    again = run(out, "run-again", ["p", "q"])
    sink.commit(again, manifest(again))
    assert sink.read_manifest(str(out))["run_id"] == "run-again"
    assert sorted(sink.read_committed(str(out)).column("id").to_pylist()) == ["p", "q"]
    # Only the committed run's parts remain: the old run's and the crashed commit's are gone.
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(p.name for p in again.parts)
    assert sorted(p.name for p in (out / "_manifests").iterdir()) == [
        "run-again.json", "run-new.json", "run-old.json"]


def test_success_naming_a_run_without_its_manifest_is_an_error(tmp_path):
    out = tmp_path / "out"
    w = run(out, "run-a", ["x"])
    sink.commit(w, manifest(w))
    (out / "_SUCCESS").write_text("run-b\n")
    with pytest.raises(sink.SinkError, match="names run 'run-b' but no manifest of that run"):
        sink.read_manifest(str(out))


def test_nothing_committed_reads_as_none(tmp_path):
    assert sink.read_manifest(str(tmp_path / "empty")) is None
    with pytest.raises(sink.SinkError, match="no committed run"):
        sink.read_committed(str(tmp_path / "empty"))
