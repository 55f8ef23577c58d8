"""One test per input format (image files are covered in test_pipeline and test_storage):
WebDataset tars, Parquet with image bytes, manifests, Azure ML request files. Each checks
rows out = rows in, the ids, the bad rows' errors and the passthrough columns."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import put

from batchscore import pipeline
from batchscore.config import ScoreConfig
from batchscore.exceptions import ListingError
from batchscore.inputs import listing
from batchscore.plan import listing_spec


def tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def by_id(result) -> dict[str, dict]:
    rows = result.to_arrow().to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == result.rows
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def images(photos) -> dict[str, bytes]:
    return {n: (photos / n).read_bytes() for n in ("rocket.jpg", "chelsea.png", "coffee.png", "china.jpg")}


@pytest.fixture(scope="module")
def http_server(photos):
    """Serves the photo folder on 127.0.0.1 for http(s):// inputs; stopped at the end."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(photos))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_webdataset_tar_shards_on_gcs(ray_session, tmp_path, images, checkpoints):
    base = "gs://bs-formats/shards"
    s0 = put(f"{base}/shard-000000.tar", tar_bytes([
        ("s/000.jpg", images["rocket.jpg"]), ("s/000.cls", b"7"), ("s/000.json", b"{}"),
        ("s/001.png", images["chelsea.png"]), ("s/001.cls", b"3"),
        ("s/002.txt", b"a sample with no image member"),
        ("s/003.jpg", b"\xff\xd8\xff not really a jpeg"), ("s/003.cls", b"1"),
    ]))
    s1 = put(f"{base}/shard-000001.tar.gz", tar_bytes([("004.webp.png", images["coffee.png"])], mode="w:gz"))
    whole = tar_bytes([("005.jpg", images["china.jpg"]), ("006.jpg", images["rocket.jpg"])])
    s2 = put(f"{base}/shard-000002.tar", whole[: len(whole) - len(images["rocket.jpg"]) // 2 - 1024])
    result = pipeline.score(ScoreConfig(input=(base,), output=str(tmp_path / "out"), model=str(checkpoints["vit"]),
                                        passthrough=("cls",), top_k=2, max_error_fraction=1.0))
    rows = by_id(result)
    assert set(rows) == {f"{s0}#s/000.jpg", f"{s0}#s/001.png", f"{s0}#s/002", f"{s0}#s/003.jpg",
                         f"{s1}#004.webp.png", f"{s2}#005.jpg", s2}
    assert rows[f"{s0}#s/000.jpg"]["error"] is None and rows[f"{s0}#s/000.jpg"]["cls"] == "7"
    assert rows[f"{s0}#s/001.png"]["cls"] == "3" and len(rows[f"{s0}#s/001.png"]["labels"]) == 2
    assert rows[f"{s0}#s/002"]["error"] == "read.no_image: sample has no image member (members: .txt)"
    # JPEG's signature, then junk: a damaged JPEG, not an unsupported format
    assert rows[f"{s0}#s/003.jpg"]["error"].startswith("decode.corrupt: JPEG") and rows[f"{s0}#s/003.jpg"]["cls"] == "1"
    assert rows[f"{s1}#004.webp.png"]["error"] is None and rows[f"{s1}#004.webp.png"]["cls"] is None
    assert rows[s2]["error"].startswith("read.bad_container: tar shard unreadable after 1 samples")
    assert result.errors == 3 and result.errors_by_code == {"read.no_image": 1, "read.bad_container": 1, "decode.corrupt": 1}


def test_parquet_with_image_bytes_on_s3(ray_session, tmp_path, images, checkpoints):
    plain = pa.table({"key": ["a", "b", "c", "d", None], "label": ["can", "tin", None, "jar", "box"],
                      "image": [images["rocket.jpg"], images["chelsea.png"], None, b"garbage", images["coffee.png"]]})
    hf_style = pa.table({"key": ["e", "f"], "label": ["x", "y"],
                         "image": pa.array([{"bytes": images["china.jpg"], "path": "china.jpg"},
                                            {"bytes": images["coffee.png"], "path": None}],
                                           pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    for name, table in (("part-0.parquet", plain), ("part-1.parquet", hf_style)):
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=2)
        put(f"s3://bs-formats/pq/{name}", buf.getvalue())
    config = ScoreConfig(input=("s3://bs-formats/pq/",), output=str(tmp_path / "out"), model=str(checkpoints["vit"]),
                         id_column="key", passthrough=("label",), decode_batch_size=3, max_error_fraction=1.0)
    entries = listing.list_inputs(listing_spec(config))
    assert [(e.kind, e.rows) for e in entries] == [("parquet", 5), ("parquet", 2)]
    rows = by_id(pipeline.score(config))
    assert set(rows) == {"a", "b", "c", "d", "s3://bs-formats/pq/part-0.parquet#4", "e", "f"}
    assert rows["c"]["error"] == "read.no_image: no image bytes in column 'image'" and rows["c"]["label"] is None
    assert rows["d"]["error"].startswith("decode.unsupported_format: not an image")
    assert rows["s3://bs-formats/pq/part-0.parquet#4"]["error"] == "read.bad_id: null id in column 'key'"
    assert rows["a"]["error"] is None and rows["a"]["label"] == "can"
    assert rows["e"]["error"] is None and rows["f"]["label"] == "y"


def test_manifest_of_uris_everywhere(ray_session, tmp_path, photos, images, checkpoints, http_server):
    gs_uri = put("gs://bs-formats/m/rocket.jpg", images["rocket.jpg"])
    s3_uri = put("s3://bs-formats/m/chelsea.png", images["chelsea.png"])
    local = str(photos / "coffee.png")
    http = f"{http_server}/china.jpg"
    missing = "s3://bs-formats/m/missing.jpg"
    http_missing = f"{http_server}/nope.png"
    csv = "uri,label\n" + "\n".join(f"{u},{lab}" for u, lab in [
        (gs_uri, "rocket"), (s3_uri, "cat"), (local, "coffee"), (http, "city"), (missing, "gone"),
        (http_missing, "gone"), (gs_uri, "duplicate")])
    manifest = put("s3://bs-formats/m/manifest.csv", csv.encode())
    result = pipeline.score(ScoreConfig(input=(manifest,), output=str(tmp_path / "out"), model=str(checkpoints["vit"]),
                                        passthrough=("label",), max_error_fraction=1.0))
    rows = by_id(result)
    assert set(rows) == {gs_uri, s3_uri, local, http, missing, http_missing}  # the duplicate is scored once
    assert {u: rows[u]["label"] for u in rows} == {gs_uri: "rocket", s3_uri: "cat", local: "coffee", http: "city",
                                                   missing: "gone", http_missing: "gone"}
    for ok in (gs_uri, s3_uri, local, http):
        assert rows[ok]["error"] is None, rows[ok]["error"]
    assert rows[missing]["error"].startswith("read.not_found: FileNotFoundError")
    assert rows[http_missing]["error"].startswith("read.not_found: FileNotFoundError")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_manifest_formats_list_the_same_entries(tmp_path, photos, fmt):
    rows = [{"path": "chelsea.png", "y": 1}, {"path": str(photos / "coffee.png"), "y": None}]
    target = tmp_path / f"list.{fmt}"
    if fmt == "jsonl":
        target.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(rows), target)
    (tmp_path / "chelsea.png").write_bytes((photos / "chelsea.png").read_bytes())
    entries = listing.list_inputs(listing_spec(ScoreConfig(input=(str(target),), uri_column="path", passthrough=("y",))))
    assert [(e.uri, e.passthrough) for e in entries] == [
        (str(photos / "coffee.png"), {"y": None}), (f"{tmp_path}/chelsea.png", {"y": "1"})]
    with pytest.raises(ListingError, match=r"expected column\(s\) \['uri'\]"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(target),), input_format="manifest")))


def test_azureml_request_files(ray_session, tmp_path, images, checkpoints, http_server):
    b64 = lambda name: base64.b64encode(images[name]).decode()  # noqa: E731
    plain = put(str(tmp_path / "in" / "batch-1.json"), json.dumps(
        {"input_data": [b64("rocket.jpg"), f"{http_server}/chelsea.png", "not base64 !!", b64("china.jpg")]}).encode())
    split = put(str(tmp_path / "in" / "batch-2.json"), json.dumps(
        {"input_data": {"columns": ["image"], "index": [10, 11], "data": [[b64("coffee.png")], [42]]}}).encode())
    broken = put(str(tmp_path / "in" / "batch-3.json"), b'{"inputs": []}')
    result = pipeline.score(ScoreConfig(input=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
                                        model=str(checkpoints["deit"]), max_error_fraction=1.0))
    rows = by_id(result)
    assert set(rows) == {f"{plain}#0", f"{plain}#1", f"{plain}#2", f"{plain}#3", f"{split}#10", f"{split}#11", broken}
    assert [rows[f"{plain}#{i}"]["error"] for i in (0, 1, 3)] == [None, None, None]
    assert rows[f"{plain}#2"]["error"] == "read.no_image: neither valid base64 nor a URL"
    assert rows[f"{split}#10"]["error"] is None
    assert rows[f"{split}#11"]["error"] == "read.no_image: expected a base64 image or a URL, got int"
    assert rows[broken]["error"].startswith("read.bad_container: not an Azure ML image request: KeyError")


def test_format_detection(tmp_path, photos):
    (tmp_path / "a.tar").write_bytes(tar_bytes([("x.jpg", b"")]))
    (tmp_path / "notes.txt").write_text("x")
    assert {e.kind for e in listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path),))))} == {"tar"}
    (tmp_path / "b.png").write_bytes((photos / "chelsea.png").read_bytes())
    entries = listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path),))))  # images win; the tar is skipped, logged
    assert [e.uri.rsplit("/", 1)[-1] for e in entries] == ["b.png"]
    pq.write_table(pa.table({"other": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ListingError, match="cannot tell the input format"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(tmp_path / "t.parquet"),))))
