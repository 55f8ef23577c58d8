"""Which files a listing takes: a path as written before a glob, `_` names are ordinary, `.`
names are hidden, batchscore's own output files are skipped by name, an empty folder says so.

Each test builds its own small input from real photos (conftest's `small_photos`), every file
with different pixels, so a listing or read that picks a sibling is caught by its bytes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import put, small_photos
from PIL import Image

from batchscore import pipeline
from batchscore.config import ScoreConfig
from batchscore.exceptions import ListingError
from batchscore.inputs import listing, read
from batchscore.outputs import output as sink
from batchscore.outputs.staging import RUN_INFO
from batchscore.plan import listing_spec

# Names whose own characters are glob syntax, each next to the sibling its glob would match.
LITERAL_FILES = {  # input as written -> (its file, the sibling a glob of it matches)
    "photos/photo[1].jpg": ("photos/photo[1].jpg", "photos/photo1.jpg"),
    "q/what?.jpg": ("q/what?.jpg", "q/whatX.jpg"),
    "s/star*.jpg": ("s/star*.jpg", "s/starZ.jpg"),
}
LITERAL_FOLDERS = {  # folder as written -> (its file, the sibling folder's file)
    "shots/dir[1]/": ("shots/dir[1]/a.jpg", "shots/dir1/b.jpg"),
    "marks/what?/": ("marks/what?/c.jpg", "marks/whatX/d.jpg"),
    "stars/all*": ("stars/all*/e.jpg", "stars/allZ/f.jpg"),
}


def jpegs(names: list[str], scratch: Path, seed: int = 0) -> dict[str, bytes]:
    """{name: JPEG bytes}, one distinct real-photo crop per name."""
    out = {}
    for name, src in zip(names, small_photos(scratch, len(names), seed=seed)):
        path = scratch / f"{src.stem}.enc.jpg"
        Image.open(src).convert("RGB").save(path, format="JPEG", quality=90)
        out[name] = path.read_bytes()
    return out


def write_tree(root: str, files: dict[str, bytes]) -> None:
    """Writes files under a local folder or a bucket prefix (no glob expansion anywhere)."""
    for name, data in files.items():
        if "://" in root:
            put(f"{root}/{name}", data)
        else:
            target = Path(root) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)


def uri_of(root: str, name: str) -> str:
    return f"{root}/{name}" if "://" in root else str(Path(root) / name)


def ids(config: ScoreConfig) -> list[str]:
    return [e.id for e in listing.list_inputs(listing_spec(config))]


def check_literal_names(root: str, scratch: Path, caplog) -> None:
    """Every input whose name holds `[`, `?` or `*` lists exactly itself, and reads its own bytes."""
    names = [n for pair in [*LITERAL_FILES.values(), *LITERAL_FOLDERS.values()] for n in pair]
    data = jpegs(names, scratch)
    write_tree(root, data)
    for given, (own, sibling) in {**LITERAL_FILES, **LITERAL_FOLDERS}.items():
        caplog.clear()
        entries = listing.list_inputs(listing_spec(ScoreConfig(input=(uri_of(root, given),))))
        assert [e.id for e in entries] == [uri_of(root, own)], given
        got, error = read.fetch(entries[0].uri, retries=1)
        assert error == "" and got == data[own] and got != data[sibling], given
        assert f"input {uri_of(root, given)!r}: a path as written" in caplog.text
        assert "expanded as a glob" not in caplog.text
    # The folders holding them list every file, by its own name.
    for parent in ("photos", "q", "s", "shots", "marks", "stars"):
        want = sorted(uri_of(root, n) for n in names if n.startswith(parent + "/"))
        assert ids(ScoreConfig(input=(uri_of(root, parent),))) == want, parent
    # A path that does not exist is still a glob; `[[]` matches a literal `[` inside one.
    caplog.clear()
    assert ids(ScoreConfig(input=(uri_of(root, "photos/photo*.jpg"),))) == [
        uri_of(root, "photos/photo1.jpg"), uri_of(root, "photos/photo[1].jpg")]
    assert "no such path, expanded as a glob: 2 file(s)" in caplog.text
    assert ids(ScoreConfig(input=(uri_of(root, "shots/dir[[]1]/*.jpg"),))) == [uri_of(root, "shots/dir[1]/a.jpg")]


def test_local_names_with_glob_characters_are_taken_as_written(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchscore.inputs.listing")
    check_literal_names(str(tmp_path / "in"), tmp_path / "scratch", caplog)


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_bucket_keys_with_glob_characters_are_taken_as_written(object_stores, tmp_path, caplog, scheme):
    caplog.set_level(logging.INFO, logger="batchscore.inputs.listing")
    root = f"{scheme}://bs-listing-rules-{scheme}/in"
    check_literal_names(root, tmp_path / "scratch", caplog)
    # A folder placeholder object (`prefix/`, zero bytes) is a folder, not a file to read.
    fs, path = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{path}/empty/", b"")
    fs.invalidate_cache()
    with pytest.raises(ListingError, match=r"/in/empty/?': the folder holds no files$"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(f"{root}/empty/",))))


def test_manifest_row_with_brackets_reads_that_file_not_its_sibling(tmp_path):
    data = jpegs(["photo[1].jpg", "photo1.jpg"], tmp_path / "scratch")
    write_tree(str(tmp_path / "in"), data)
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text("uri\nphoto[1].jpg\n")
    inputs = listing.listed(listing_spec(ScoreConfig(input=(str(manifest),))))
    assert [e.id for e in inputs.entries()] == [str(tmp_path / "in" / "photo[1].jpg")]
    inputs.write(fsspec.filesystem("file"), str(tmp_path / "_listing"), [0, 1])  # as the driver plans it
    (task,) = read.tasks(inputs, None)
    batch = {k: np.array([v], dtype=object) for k, v in task.items()}
    (rows,) = list(read.read_batch(batch, options=read.ReadOptions()))
    assert list(rows["id"]) == [str(tmp_path / "in" / "photo[1].jpg")] and list(rows["error"]) == [""]
    assert rows["data"][0] == data["photo[1].jpg"] != data["photo1.jpg"]


def test_underscore_names_are_ordinary_and_dot_names_hidden(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchscore.inputs.listing")
    names = ["_DSC0001.JPG", "_exports/IMG_0002.jpg", "IMG_0003.jpeg", "a/_b/_c.PNG",
             ".thumbs/IMG_0003.jpg", ".hidden.jpg", "a/.cache/x.jpg"]
    write_tree(str(tmp_path / "in"), jpegs(names, tmp_path / "scratch"))
    got = ids(ScoreConfig(input=(str(tmp_path / "in"),)))
    assert got == sorted(str(tmp_path / "in" / n) for n in names[:4])
    assert "skipped 3 hidden file(s) (a path part starting with '.') under the inputs" in caplog.text
    # Upper-case endings are endings: a `.JPG` file is an image.
    assert ids(ScoreConfig(input=(str(tmp_path / "in" / "_DSC0001.JPG"),))) == [str(tmp_path / "in" / "_DSC0001.JPG")]
    # A glob skips hidden files under its fixed part, as a folder does; a named file is taken.
    in_folders = ids(ScoreConfig(input=(str(tmp_path / "in" / "*" / "*.jpg"),)))
    assert in_folders == [str(tmp_path / "in" / "_exports" / "IMG_0002.jpg")]
    assert ids(ScoreConfig(input=(str(tmp_path / "in" / ".hidden.jpg"),))) == [str(tmp_path / "in" / ".hidden.jpg")]


@pytest.fixture(scope="module")
def underscore_run(ray_session, tmp_path_factory):
    """One end-to-end run (demo model) of a folder of `_` names plus a literal `photo[1].jpg`."""
    root = tmp_path_factory.mktemp("underscore")
    names = ["in/_DSC0001.JPG", "in/_exports/IMG_0002.jpg", "photos/photo[1].jpg", "photos/photo1.jpg"]
    data = jpegs(names, root / "scratch", seed=3)
    write_tree(str(root), data)
    output = root / "out"
    result = pipeline.score(ScoreConfig(input=(str(root / "in"), str(root / "photos/photo[1].jpg")),
                                        output=str(output), model=None, top_k=1, batch_size=4))
    return root, output, result


def test_underscore_files_and_folders_are_scored_and_committed(underscore_run):
    root, output, result = underscore_run
    assert result.status == "committed"
    frame = sink.read_committed(str(output)).to_pandas()
    assert sorted(frame["id"]) == sorted(str(root / n) for n in
                                         ["in/_DSC0001.JPG", "in/_exports/IMG_0002.jpg", "photos/photo[1].jpg"])
    assert frame["error"].isna().all() and frame["labels"].map(len).eq(1).all()
    assert (frame["source"] == frame["id"]).all()


def test_a_committed_runs_own_files_in_an_input_folder_are_not_listed(underscore_run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="batchscore.inputs.listing")
    _, output, result = underscore_run
    folder = tmp_path / "requests"
    folder.mkdir()
    request = folder / "r1.json"
    request.write_text(json.dumps({"input_data": ["aGVsbG8="]}))
    shutil.copytree(output, folder / "scores")  # _SUCCESS, _manifest.json, _manifests/<run>.json, parts
    staging = folder / "scores" / sink.STAGING / result.run_id
    staging.mkdir(parents=True)
    (staging / "_errors.json").write_text("{}")
    (staging / RUN_INFO).write_text("{}")
    own = [p for p in (folder / "scores").rglob("*") if p.is_file() and not p.name.endswith(".parquet")]
    assert {p.name for p in own} >= {sink.SUCCESS, sink.MANIFEST, f"{result.run_id}.json", "_errors.json"}
    for fmt in ("auto", "azureml"):
        caplog.clear()
        entries = listing.list_inputs(listing_spec(ScoreConfig(input=(str(folder),), input_format=fmt)))
        assert [(e.id, e.kind) for e in entries] == [(str(request), "azureml")], fmt
        assert f"{len(own)} of batchscore's own file(s)" in caplog.text
    # A folder holding only a run's own files (its parts gone) holds nothing to read.
    for part in (folder / "scores").glob("*.parquet"):
        part.unlink()
    with pytest.raises(ListingError, match=rf"the folder holds no files but {len(own)} of batchscore's own"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(folder / "scores"),))))


def test_an_empty_folder_says_it_holds_no_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ListingError, match=r"empty': the folder holds no files$"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "empty"),))))
    only_hidden = tmp_path / "dots"
    write_tree(str(only_hidden), {".DS_Store": b"x", ".thumbs/a.jpg": b"y"})
    with pytest.raises(ListingError,
                       match=r"dots': the folder holds no files but 2 hidden file\(s\) \(a path part starting with "
                             r"'\.'\), which are not read"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(only_hidden),))))


def test_a_glob_that_matches_nothing_still_errors(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / ".x.jpg").write_bytes(b"x")
    with pytest.raises(ListingError, match=r"no such path, and the glob matched no file$"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "in" / "photo[1].jpg"),))))
    with pytest.raises(ListingError, match=r"the glob matched no file but 1 hidden file"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "in" / "*.jpg"),))))
    with pytest.raises(ListingError, match="no such file or directory"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "in" / "missing.jpg"),))))


def test_a_glob_matching_folders_lists_them_whole(tmp_path):
    """`images/dt=2026-11-*` is how partitions are named: the folders it matches are listed
    recursively (their hidden files still skipped), not refused as 'matched no file'."""
    root = str(tmp_path / "images")
    write_tree(root, {**jpegs(["dt=2026-11-01/a.jpg", "dt=2026-11-02/sub/b.jpg", "dt=2026-10-31/c.jpg"],
                              tmp_path / "scratch"), "dt=2026-11-02/.DS_Store": b"x"})
    assert ids(ScoreConfig(input=(f"{root}/dt=2026-11-*",))) == [
        uri_of(root, "dt=2026-11-01/a.jpg"), uri_of(root, "dt=2026-11-02/sub/b.jpg")]


def test_symbolic_links_to_files_are_files_in_folders_and_globs(tmp_path, caplog):
    """A Hugging Face / DVC cache is a folder of links to blobs: each link is its file, under
    its own path, whether the folder or a glob names it; a link to a folder is not followed,
    and the log says so."""
    real = tmp_path / "blobs"
    write_tree(str(real), jpegs(["a1"], tmp_path / "scratch"))
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "a.jpg").symlink_to(real / "a1")
    (tmp_path / "snap" / "more").symlink_to(real, target_is_directory=True)
    assert ids(ScoreConfig(input=(str(snap / "*.jpg"),))) == [str(snap / "a.jpg")]
    with caplog.at_level(logging.WARNING, logger="batchscore.inputs.listing"):
        assert ids(ScoreConfig(input=(str(snap),))) == [str(snap / "a.jpg")]
    assert "not following" in caplog.text and "more" in caplog.text


def test_manifest_paths_are_normalized_so_one_image_is_one_row(tmp_path, caplog):
    """`../imgs/a.jpg` in one manifest and `/…/imgs/a.jpg` in another are the same image:
    one entry, its id the path it names (no `..`), the first row's columns kept and the
    repeated URI named in the warning."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "m").mkdir()
    absolute = tmp_path / "m" / "abs.csv"
    absolute.write_text(f"uri,label\n{tmp_path}/imgs/a.jpg,first\n{tmp_path}/imgs/./b.jpg,b\n")
    relative = tmp_path / "m" / "rel.csv"
    relative.write_text("uri,label\n../imgs/a.jpg,second\n")
    caplog.set_level(logging.WARNING, logger="batchscore.inputs.listing")
    entries = listing.list_inputs(listing_spec(ScoreConfig(input=(str(absolute), str(relative)), passthrough=("label",))))
    assert [(e.id, e.passthrough["label"]) for e in entries] == [
        (f"{tmp_path}/imgs/a.jpg", "first"), (f"{tmp_path}/imgs/b.jpg", "b")]
    assert f"more than once, e.g. ['{tmp_path}/imgs/a.jpg']" in caplog.text
