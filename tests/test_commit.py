"""The commit protocol on a real directory: `_SUCCESS` is the single commit point."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchscore.exceptions import SinkError
from batchscore.outputs import commit, staging, write
from batchscore.outputs import output as sink


class Staged:
    """A run staged as the workers stage one: parts of two rows written by `write.write_part`."""

    def __init__(self, output, run_id: str, ids: list[str]):
        self.run_id, self.staging = run_id, staging.Staging(str(output), run_id, info={"run_id": run_id})
        self.fs = self.staging.fs
        spec = write.PartSpec(output=str(output), run_id=run_id, model="m@sha256:0")
        self.parts = []
        for start in range(0, len(ids), 2):
            chunk = ids[start:start + 2]
            batch = pa.table({"id": chunk, "labels": [["a"]] * len(chunk), "probs": [[1.0]] * len(chunk),
                              "error": [None] * len(chunk), "error_code": [None] * len(chunk),
                              "meta": [json.dumps({"source": i, "index": start + k, "passthrough": {}})
                                       for k, i in enumerate(chunk)]},
                             schema=pa.schema([("id", pa.string()), ("labels", pa.list_(pa.string())),
                                               ("probs", pa.list_(pa.float32())), ("error", pa.string()),
                                               ("error_code", pa.string()), ("meta", pa.string())]))
            self.parts.append(json.loads(write.write_part(batch, spec=spec).column("part")[0].as_py()))

    def commit(self):
        manifest = {"run_id": self.run_id, "files": [{"name": p["name"], "rows": p["rows"]} for p in self.parts]}
        return commit.commit(self.staging, [p["name"] for p in self.parts], manifest)


def run(output, run_id: str, ids: list[str]) -> Staged:
    return Staged(output, run_id, ids)


def test_overwrite_crash_before_the_commit_point_keeps_the_old_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = run(out, "run-old", ["x", "y", "z"])
    old.commit()
    assert sorted(sink.read_committed(str(out)).column("id").to_pylist()) == ["x", "y", "z"]

    new = run(out, "run-new", ["p", "q"])
    real = type(new.fs).pipe_file

    def crash_on_success(self, path, *args, **kwargs):
        if path.endswith("/_SUCCESS"):
            raise OSError("driver died here")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(type(new.fs), "pipe_file", crash_on_success)
    with pytest.raises(OSError, match="driver died here"):
        new.commit()
    monkeypatch.undo()
    # The new parts and manifests are in place, but _SUCCESS still names the old run: readers
    # see exactly the old run, all of it.
    assert json.loads((out / "_manifest.json").read_text())["run_id"] == "run-new"
    assert sink.read_manifest(str(out))["run_id"] == "run-old"
    assert sorted(sink.read_committed(str(out)).column("id").to_pylist()) == ["x", "y", "z"]

    again = run(out, "run-again", ["p", "q"])
    again.commit()
    assert sink.read_manifest(str(out))["run_id"] == "run-again"
    assert sorted(sink.read_committed(str(out)).column("id").to_pylist()) == ["p", "q"]
    # Only the committed run's parts remain: the old run's and the crashed commit's are gone.
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(p["name"] for p in again.parts)
    assert sorted(p.name for p in (out / "_manifests").iterdir()) == [
        "run-again.json", "run-new.json", "run-old.json"]


def test_success_naming_a_run_without_its_manifest_is_an_error(tmp_path):
    out = tmp_path / "out"
    w = run(out, "run-a", ["x"])
    w.commit()
    (out / "_SUCCESS").write_text("run-b\n")
    with pytest.raises(SinkError, match="names run 'run-b' but no manifest of that run"):
        sink.read_manifest(str(out))


def test_nothing_committed_reads_as_none(tmp_path):
    assert sink.read_manifest(str(tmp_path / "empty")) is None
    with pytest.raises(SinkError, match="no committed run"):
        sink.read_committed(str(tmp_path / "empty"))


@pytest.mark.parametrize("root", ["local", "memory://bs-glob-test"])
def test_an_output_with_glob_characters_never_touches_its_look_alike(tmp_path, root):
    """`out/run[1]` is that folder, not a pattern matching `out/run1`: committing there (which
    deletes old parts and the staging folder) leaves the look-alike's committed run whole.
    memory:// shares the object stores' fsspec base class (gcsfs, s3fs)."""
    base = str(tmp_path) if root == "local" else root
    plain, brackets = f"{base}/out/run1", f"{base}/out/run[1]"
    run(plain, "run-a", ["x", "y", "z"]).commit()
    run(brackets, "run-b", ["p"]).commit()
    run(brackets, "run-c", ["q"]).commit()  # replaces run-b: deletes its parts and staging
    assert sorted(sink.read_committed(plain).column("id").to_pylist()) == ["x", "y", "z"]
    assert sink.read_committed(brackets).column("id").to_pylist() == ["q"]


def test_read_committed_refuses_a_missing_or_changed_part(tmp_path):
    """The manifest lists each part's rows: a part deleted or rewritten after the commit is
    an error naming it, never fewer rows returned quietly."""
    out = tmp_path / "out"
    staged = run(out, "run-a", ["x", "y", "z"])
    staged.commit()
    first, second = (out / p["name"] for p in staged.parts)
    sink.read_committed(str(out))
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(second).slice(0, 0), second)
    with pytest.raises(SinkError, match=rf"part {second.name} holds 0 rows, its run's manifest says 1"):
        sink.read_committed(str(out))
    first.unlink()
    with pytest.raises(SinkError, match=rf"lists part {first.name}, which is missing"):
        sink.read_committed(str(out))
