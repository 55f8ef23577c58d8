"""Tar shards: every image member of a shard ends as a row, and a shard's announced row count
is what its member headers call for, so a member lost on the way fails the run.

The read-level tests run `read.read_batch` in this process on real tars of real pictures,
then the write stage's statistics and the driver's check (`write.conform`, `run.check_rows`); two tests run
the whole pipeline (the demo model): the issue's shard scored, and the same loss failing a run.
"""

from __future__ import annotations

import io
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from conftest import small_photos
from PIL import Image

from batchscore import errors, pipeline
from batchscore.config import ScoreConfig
from batchscore.driver import run
from batchscore.exceptions import SinkError
from batchscore.inputs import listing, read
from batchscore.outputs import output as sink
from batchscore.outputs import write
from batchscore.plan import listing_spec


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, bytes]:
    """Real small pictures: four JPEGs, a PNG, and a PPM (a format known but off by default)."""
    paths = small_photos(tmp_path_factory.mktemp("pictures"), 6)
    jpgs = [p.read_bytes() for p in paths if p.suffix == ".jpg"]
    png = next(p for p in paths if p.suffix == ".png").read_bytes()
    ppm = io.BytesIO()
    Image.open(paths[1]).save(ppm, "PPM")
    return {"a.jpg": jpgs[0], "b.jpg": jpgs[1], "c.jpg": jpgs[2], "d.jpg": jpgs[3], "e.png": png,
            "f.ppm": ppm.getvalue()}


def write_tar(path, members: list) -> str:
    """A tar of (name, bytes) members, or of ready TarInfo objects (links); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return str(path)


def read_shards(folder, passthrough=("cls",)) -> tuple[dict[str, dict], dict[str, int]]:
    """Lists `folder` as tar shards and reads them as a run's read task does, then checks the
    rows as the driver does before a commit (raises SinkError on a mismatch).

    Returns:
        ({id: row}, {shard id: its announced row count}).
    """
    inputs = listing.listed(listing_spec(ScoreConfig(input=(str(folder),), input_format="tar", passthrough=passthrough)))
    entries = inputs.entries()
    inputs.write(fsspec.filesystem("file"), str(folder.parent / "_listing"), read.task_bounds(len(entries), True, 1, 1))
    tasks = read.tasks(inputs, None)  # one read task per shard, as the driver plans them
    batch = {k: np.array([t[k] for t in tasks], dtype=object) for k in tasks[0]}
    out = list(read.read_batch(batch, options=read.ReadOptions(passthrough=passthrough, batch_size=2)))
    rows = [dict(zip(("id", "error", "meta"), r)) for b in out for r in zip(b["id"], b["error"], b["meta"])]
    scored = pa.table({"id": [r["id"] for r in rows], "labels": [None] * len(rows), "probs": [None] * len(rows),
                       "error": [r["error"] or None for r in rows],
                       "error_code": [errors.code_of(r["error"]) for r in rows], "meta": [r["meta"] for r in rows]},
                      schema=pa.schema([("id", pa.string()), ("labels", pa.list_(pa.string())),
                                        ("probs", pa.list_(pa.float32())), ("error", pa.string()),
                                        ("error_code", pa.string()), ("meta", pa.string())]))
    table, stats = write.conform(scored, write.PartSpec(output="unused", run_id="r", model="m",
                                                        passthrough=passthrough, containers=True))
    coverage = run.Coverage()
    coverage.add(stats)
    run.check_rows(inputs, coverage, table.num_rows)  # as the driver checks before a commit
    totals = {entries[int(i)].id: announced for i, (_, announced) in stats["containers"].items() if announced}
    data = [d for b in out for d in b["data"]]
    return {r["id"]: {**r, "error": raw["error"], "data": d}  # the read stage's error: "" for none
            for r, raw, d in zip(table.to_pylist(), rows, data)}, totals


def test_issue_shard_scores_every_image_member(ray_session, tmp_path, pictures):
    """The issue's shard, end to end: two images under one key (`IMG_2023`) are two scored
    rows, both with the sample's `.cls`; an upper-case `.JPG` is an image; a `.ppm` (known,
    not allowed by default) is a row refused by decode; a sample without an image stays one
    error row; the manifest counts them all."""
    shard = write_tar(tmp_path / "in" / "shard-000000.tar", [
        ("IMG_2023.05.01.jpg", pictures["a.jpg"]), ("IMG_2023.05.02.jpg", pictures["b.jpg"]),
        ("IMG_2023.cls", b"4"),
        ("DSC_0001.JPG", pictures["c.jpg"]), ("DSC_0001.cls", b"2"),
        ("scan.ppm", pictures["f.ppm"]), ("scan.cls", b"1"),
        ("notes.txt", b"no image here"),
    ])
    out = str(tmp_path / "out")
    result = pipeline.score(ScoreConfig(input=(str(tmp_path / "in"),), output=out, input_format="tar",
                                        passthrough=("cls",), max_error_fraction=1.0))
    rows = {r["id"]: r for r in sink.read_committed(out).to_pylist()}
    assert set(rows) == {f"{shard}#IMG_2023.05.01.jpg", f"{shard}#IMG_2023.05.02.jpg", f"{shard}#DSC_0001.JPG",
                         f"{shard}#scan.ppm", f"{shard}#notes"}
    for name in ("IMG_2023.05.01.jpg", "IMG_2023.05.02.jpg"):
        row = rows[f"{shard}#{name}"]
        assert row["error"] is None and row["labels"] and row["cls"] == "4" and row["source"] == shard
    assert rows[f"{shard}#DSC_0001.JPG"]["error"] is None and rows[f"{shard}#DSC_0001.JPG"]["cls"] == "2"
    assert rows[f"{shard}#scan.ppm"]["error_code"] == "decode.unsupported_format"
    assert rows[f"{shard}#scan.ppm"]["cls"] == "1" and rows[f"{shard}#scan.ppm"]["labels"] is None
    assert rows[f"{shard}#notes"]["error"] == "read.no_image: sample has no image member (members: .txt)"
    assert (result.rows, result.errors) == (5, 2)
    assert result.errors_by_code == {"decode.unsupported_format": 1, "read.no_image": 1}


def test_image_member_lost_in_the_workers_fails_the_run(ray_session, tmp_path, pictures, monkeypatch):
    """Fault injection, end to end: the Ray read tasks run a `read_batch` whose tar reader
    builds a sample's rows as the issue's reader did, keeping only the first image member
    (`read._sample_rows` replaced inside the worker, for that task only). The reader still
    counts both images from the headers, so the shard announces 3 rows, 2 arrive, and the run
    fails before commit: SinkError, nothing committed."""

    def read_batch_losing_second_images(batch, *, options):
        from batchscore.inputs import read as worker_read

        real = worker_read._sample_rows

        def first_image_only(uri, sample, ids, options):
            yield from list(real(uri, sample, ids, options))[:1]

        worker_read._sample_rows = first_image_only
        try:
            yield from worker_read.read_batch(batch, options=options)
        finally:
            worker_read._sample_rows = real

    write_tar(tmp_path / "in" / "shard-000000.tar", [
        ("IMG_2023.05.01.jpg", pictures["a.jpg"]), ("IMG_2023.05.02.jpg", pictures["b.jpg"]),
        ("IMG_2023.cls", b"4"), ("DSC_0001.jpg", pictures["c.jpg"]),
    ])
    monkeypatch.setattr(read, "read_batch", read_batch_losing_second_images)  # what build_dataset hands Ray
    out = tmp_path / "out"
    with pytest.raises(SinkError, match=r"wrong number of rows .*shard-000000.tar', 2, 3\)"):
        pipeline.score(ScoreConfig(input=(str(tmp_path / "in"),), output=str(out), input_format="tar",
                                   passthrough=("cls",), max_error_fraction=1.0))
    assert sink.read_manifest(str(out)) is None and not (out / sink.SUCCESS).exists()
    with pytest.raises(SinkError, match="no committed run"):
        sink.read_committed(str(out))


def test_member_lost_after_being_counted_fails_the_check(tmp_path, pictures, monkeypatch):
    """The same loss in this process: the reader counts the image members from the headers;
    a fault in building the rows (the issue's: only the first image of a sample kept) leaves
    the shard one row short of what it announced, and the driver's check raises."""
    write_tar(tmp_path / "in" / "s.tar", [("IMG_2023.05.01.jpg", pictures["a.jpg"]),
                                         ("IMG_2023.05.02.jpg", pictures["b.jpg"]), ("IMG_2023.cls", b"4")])
    rows, totals = read_shards(tmp_path / "in")  # intact: 2 rows announced, 2 read
    assert len(rows) == 2 and list(totals.values()) == [2]
    real = read._sample_rows
    monkeypatch.setattr(read, "_sample_rows", lambda *a: iter(list(real(*a))[:1]))
    with pytest.raises(SinkError, match=r"1 input\(s\) gave the wrong number of rows .*s.tar', 1, 2\)"):
        read_shards(tmp_path / "in")


def test_reader_that_yields_nothing_still_announces_its_count(tmp_path, pictures, monkeypatch):
    """A shard whose every row is lost would carry no count at all, and the driver would take
    it for an empty shard; instead its one row says so, with the count, and the check fails."""
    write_tar(tmp_path / "in" / "s.tar", [("x.01.jpg", pictures["a.jpg"]), ("x.02.jpg", pictures["b.jpg"])])
    monkeypatch.setattr(read, "_sample_rows", lambda *a: iter(()))
    with pytest.raises(SinkError, match=r"s.tar', 1, 2\)"):
        read_shards(tmp_path / "in")


def test_dotted_and_upper_case_names_every_image_a_row(tmp_path, pictures):
    shard = write_tar(tmp_path / "in" / "s.tar", [
        ("d/IMG_2023.05.01.jpg", pictures["a.jpg"]), ("d/IMG_2023.05.02.JPEG", pictures["b.jpg"]),
        ("d/IMG_2023.json", b"{}"), ("d/IMG_2023.cls", b"4"), ("d/IMG_2023.05.03.png", pictures["e.png"]),
        ("d/x.seg.PNG", pictures["e.png"]), ("d/x.f.ppm", pictures["f.ppm"]),
    ])
    rows, totals = read_shards(tmp_path / "in")
    assert list(rows) == [f"{shard}#d/IMG_2023.05.01.jpg", f"{shard}#d/IMG_2023.05.02.JPEG",
                          f"{shard}#d/IMG_2023.05.03.png", f"{shard}#d/x.seg.PNG", f"{shard}#d/x.f.ppm"]
    assert [r["cls"] for r in rows.values()] == ["4", "4", "4", None, None]
    assert all(r["error"] == "" and r["data"] for r in rows.values())  # decode decides about the .ppm
    assert rows[f"{shard}#d/x.f.ppm"]["data"] == pictures["f.ppm"] and totals == {shard: 5}


def test_repeated_member_names_are_error_rows(tmp_path, pictures):
    """The first of a repeated name is read; each repeat is a `~N` error row, never a silent
    replacement, and a second passthrough member of a sample likewise."""
    shard = write_tar(tmp_path / "in" / "s.tar", [
        ("a.jpg", pictures["a.jpg"]), ("a.cls", b"1"), ("a.jpg", pictures["b.jpg"]), ("a.CLS", b"2"),
        ("b.jpg", pictures["c.jpg"]), ("a.jpg", pictures["d.jpg"]),
    ])
    rows, totals = read_shards(tmp_path / "in")
    assert list(rows) == [f"{shard}#a.jpg", f"{shard}#a.jpg~2", f"{shard}#a.CLS", f"{shard}#b.jpg",
                          f"{shard}#a.jpg~3"]
    assert rows[f"{shard}#a.jpg"]["data"] == pictures["a.jpg"] and rows[f"{shard}#a.jpg"]["cls"] == "1"
    assert rows[f"{shard}#a.jpg~2"]["error"] == ("read.bad_id: member name 'a.jpg' appears again in the shard "
                                                 "(occurrence 2); only the first is read")
    assert rows[f"{shard}#a.CLS"]["error"] == ("read.bad_id: the sample already has a .cls member ('a.cls'); "
                                               "only the first is read")
    assert rows[f"{shard}#a.jpg~3"]["error"].startswith("read.bad_id: member name 'a.jpg' appears again")
    assert rows[f"{shard}#a.jpg~3"]["cls"] is None  # a later run of key `a` is a sample of its own
    assert totals == {shard: 5}


def test_a_key_that_comes_back_is_a_new_sample(tmp_path, pictures):
    """WebDataset groups consecutive members only: a `.cls` arriving after other keys does not
    reach the earlier image row; it is its own sample, an error row that says why."""
    shard = write_tar(tmp_path / "in" / "s.tar", [
        ("late.jpg", pictures["a.jpg"]), ("notes.txt", b"n"), ("other.jpg", pictures["b.jpg"]),
        ("late.cls", b"7"), ("late.05.jpg", pictures["c.jpg"]), ("notes.json", b"{}"),
    ])
    rows, totals = read_shards(tmp_path / "in")
    assert list(rows) == [f"{shard}#late.jpg", f"{shard}#notes", f"{shard}#other.jpg", f"{shard}#late.05.jpg",
                          f"{shard}#notes~2"]
    assert rows[f"{shard}#late.jpg"]["cls"] is None and rows[f"{shard}#late.05.jpg"]["cls"] == "7"
    assert rows[f"{shard}#notes~2"]["error"] == (
        "read.no_image: sample has no image member (members: .json); its key 'notes' came earlier in the shard "
        "too: a sample's members must be adjacent")
    assert totals == {shard: 5}


def test_image_named_links_are_error_rows(tmp_path, pictures):
    hard, sym, folder = tarfile.TarInfo("b.jpg"), tarfile.TarInfo("c.png"), tarfile.TarInfo("dir")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a.jpg"
    sym.type, sym.linkname = tarfile.SYMTYPE, "../elsewhere.png"
    folder.type = tarfile.DIRTYPE
    shard = write_tar(tmp_path / "in" / "s.tar", [("a.jpg", pictures["a.jpg"]), folder, hard, sym])
    rows, totals = read_shards(tmp_path / "in")
    assert [(i, r["error"]) for i, r in rows.items()] == [
        (f"{shard}#a.jpg", ""),
        (f"{shard}#b.jpg", "read.no_image: member 'b.jpg' is a hard link to 'a.jpg', not the image's bytes"),
        (f"{shard}#c.png", "read.no_image: member 'c.png' is a symbolic link to '../elsewhere.png', "
                           "not the image's bytes")]
    assert totals == {shard: 3}


@pytest.mark.parametrize("cut_in, kept, samples", [("IMG.02.jpg", [], 0), ("z.jpg", ["IMG.01.jpg", "IMG.02.jpg"], 1)])
def test_truncated_shard_announces_the_rows_it_gives(tmp_path, pictures, cut_in, kept, samples):
    """Cut inside a sample, the shard gives its complete samples' rows and one row for the
    rest (the sample cut short included), and announces exactly those."""
    whole = write_tar(tmp_path / "whole.tar", [("IMG.01.jpg", pictures["a.jpg"]), ("IMG.02.jpg", pictures["b.jpg"]),
                                               ("IMG.cls", b"4"), ("z.jpg", pictures["c.jpg"])])
    with tarfile.open(whole) as tar:
        member = tar.getmember(cut_in)
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "s.tar"
    shard.write_bytes((tmp_path / "whole.tar").read_bytes()[: member.offset_data + member.size // 2])
    rows, totals = read_shards(tmp_path / "in")
    assert list(rows) == [f"{shard}#{n}" for n in kept] + [str(shard)]
    assert rows[str(shard)]["error"].startswith(f"read.bad_container: tar shard unreadable after {samples} samples")
    assert totals == {str(shard): len(kept) + 1}


def test_hidden_members_are_skipped_and_passthrough_text_is_stripped(tmp_path, pictures):
    """A shard made on a Mac carries an AppleDouble `._` twin per file (and `__MACOSX/`): the
    listing's hidden rule (a path part starting with '.') applies to members too, so they are
    neither rows nor counted. `echo 9 > x.cls` gives "9", not "9\\n"."""
    shard = write_tar(tmp_path / "in" / "s.tar", [
        ("./x.jpg", pictures["a.jpg"]), ("./x.cls", b"9\n"), ("./._x.jpg", b"\x00\x05\x16\x07AppleDouble"),
        ("__MACOSX/._y.jpg", b"\x00\x05\x16\x07"), (".thumbs/y.jpg", pictures["b.jpg"])])
    rows, totals = read_shards(tmp_path / "in")
    assert list(rows) == [f"{shard}#./x.jpg"] and totals == {shard: 1}
    assert rows[f"{shard}#./x.jpg"]["cls"] == "9"


@pytest.mark.parametrize("mode, name", [("w:bz2", "s.tar.bz2"), ("w:xz", "s.tar.xz")])
def test_compressed_shards_are_shards(tmp_path, pictures, mode, name):
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True)
    with tarfile.open(path, mode) as tar:
        info = tarfile.TarInfo("k.jpg")
        info.size = len(pictures["a.jpg"])
        tar.addfile(info, io.BytesIO(pictures["a.jpg"]))
    rows, totals = read_shards(tmp_path / "in")  # listed as a tar shard by its ending, then read
    assert list(rows) == [f"{path}#k.jpg"] and rows[f"{path}#k.jpg"]["data"] == pictures["a.jpg"]
