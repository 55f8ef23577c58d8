"""Resume: a run that died keeps its complete part files; `resume` scores only what they lack
and commits exactly the rows of a clean run (ids, labels, probabilities)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import small_photos

from batchscore import pipeline
from batchscore.config import ScoreConfig
from batchscore.exceptions import ResumeError
from batchscore.outputs import resume
from batchscore.plan import listing_spec


def assert_same_rows(frame, reference, what: str) -> None:
    """Same ids, same labels, same probabilities (to float rounding) as the clean run."""
    a, b = frame.set_index("id").sort_index(), reference.set_index("id").sort_index()
    assert frame["id"].is_unique and list(a.index) == list(b.index)
    assert [list(x) if x is not None else None for x in a["labels"]] == \
           [list(x) if x is not None else None for x in b["labels"]]
    assert list(a["error_code"].fillna("")) == list(b["error_code"].fillna(""))
    good = a["error"].isna()
    delta = max((np.abs(np.array(x) - np.array(y)).max() for x, y in zip(a["probs"][good], b["probs"][good])), default=0)
    print(f"FIGURE {what}: {len(a)} rows, same ids and labels as the clean run, max |dp| {delta:.1e}")
    assert delta < 1e-5


class Died(RuntimeError):
    pass


def run_and_die_before_commit(config: ScoreConfig, monkeypatch) -> None:
    """Scores everything into staging, then fails as a driver dying before the commit would."""
    def commit(staging, parts, manifest, check=lambda: None):
        raise Died("driver died before the commit")
    monkeypatch.setattr(pipeline, "commit", commit)
    with pytest.raises(Died):
        pipeline.score(config)
    monkeypatch.undo()


@pytest.fixture(scope="module")
def files(session_tmp):
    d = session_tmp / "resume-in"
    small_photos(d, 120, seed=1)
    return d


@pytest.fixture(scope="module")
def clean(ray_session, files, checkpoints, session_tmp):
    config = ScoreConfig(input=(str(files),), output=str(session_tmp / "resume-clean"), model=str(checkpoints["vit"]),
                         dtype="fp32", top_k=3, batch_size=8, rows_per_file=16)
    return config, pipeline.score(config).to_pandas()


def test_resume_keeps_complete_parts_discards_a_half_written_one(clean, tmp_path, monkeypatch):
    config, reference = clean
    config = config.with_overrides(output=str(tmp_path / "out"))
    run_and_die_before_commit(config, monkeypatch)
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists()
    assert sorted(p.name for p in out.iterdir()) == ["_staging"]  # a failed run leaves nothing else
    parts = sorted(out.glob("_staging/*/part-*.parquet"))
    assert len(parts) >= 120 // 16  # parts of at most rows_per_file rows, written by the workers
    half = parts[3]
    lost = pq.read_metadata(half).num_rows  # parts hold up to rows_per_file rows, as Ray Data bundles them
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # as if the run died writing it

    result = pipeline.score(config.with_overrides(resume=True))
    manifest = json.loads((out / "_manifest.json").read_text())
    attempt = manifest["attempt"]
    print(f"FIGURE resume: kept {attempt['rows_kept']} rows, scored {attempt['rows_scored']}, "
          f"discarded {attempt['parts_discarded']} half-written part")
    assert attempt["resumed"] and attempt["parts_discarded"] == 1
    assert attempt["rows_kept"] == 120 - lost and attempt["rows_scored"] == lost
    assert result.status == "committed" and result.rows == 120 and manifest["run_id"] == parts[0].parent.name
    assert not (out / "_staging").exists()
    assert_same_rows(result.to_pandas(), reference, "resume after a half-written part")


def test_resume_refuses_a_run_started_with_other_settings(clean, tmp_path, monkeypatch):
    config, _ = clean
    config = config.with_overrides(output=str(tmp_path / "out"))
    run_and_die_before_commit(config, monkeypatch)
    with pytest.raises(ResumeError, match=r"it was started with other settings \(top_k: was 3, now 2\)"):
        pipeline.score(config.with_overrides(resume=True, top_k=2))
    # Resources may change between attempts.
    result = pipeline.score(config.with_overrides(resume=True, batch_size=4, rows_per_file=50))
    assert result.status == "committed" and result.rows == 120


def test_resume_without_a_staged_run_starts_one(clean, tmp_path):
    config, reference = clean
    result = pipeline.score(config.with_overrides(output=str(tmp_path / "out"), resume=True))
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert result.status == "committed" and not manifest["attempt"]["resumed"]
    assert_same_rows(result.to_pandas(), reference, "resume with nothing staged")


def shard(samples: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_resume_drops_rows_of_tar_shards_it_cannot_prove_complete(ray_session, tmp_path, files, checkpoints,
                                                                  monkeypatch):
    """Shards straddle part files; losing a part makes some shards incomplete: their rows in
    the other parts are dropped (those parts rewritten) and the shards scored again."""
    images = sorted(files.iterdir())[:60]
    src = tmp_path / "shards"
    src.mkdir()
    for s in range(4):
        (src / f"shard-{s}.tar").write_bytes(shard([(f"{s}-{i:03d}{p.suffix}", p.read_bytes())
                                                    for i, p in enumerate(images[s * 15:(s + 1) * 15])]))
    config = ScoreConfig(input=(str(src),), output=str(tmp_path / "clean"), model=str(checkpoints["vit"]),
                         dtype="fp32", top_k=3, batch_size=8, rows_per_file=7, decode_batch_size=4)
    reference = pipeline.score(config).to_pandas()
    assert len(reference) == 60

    out = tmp_path / "out"
    config = config.with_overrides(output=str(out))
    run_and_die_before_commit(config, monkeypatch)
    parts = sorted(out.glob("_staging/*/part-*.parquet"))
    lost = parts[len(parts) // 2]
    lost_sources = set(pq.read_table(lost, columns=["source"]).column("source").to_pylist())
    lost.unlink()

    result = pipeline.score(config.with_overrides(resume=True))
    attempt = json.loads((out / "_manifest.json").read_text())["attempt"]
    print(f"FIGURE tar resume: lost part held {len(lost_sources)} shard(s); kept {attempt['rows_kept']} rows, "
          f"rewrote {attempt['parts_rewritten']} part(s), scored {attempt['rows_scored']} rows again")
    assert attempt["rows_scored"] == 15 * len(lost_sources) and attempt["rows_kept"] == 60 - attempt["rows_scored"]
    assert attempt["parts_rewritten"] >= 1
    assert_same_rows(result.to_pandas(), reference, "tar resume")


def test_the_fingerprint_takes_local_paths_as_absolute(tmp_path, monkeypatch):
    """`small` typed in tmp_path and tmp_path/small are one input for --resume; `small`
    typed elsewhere is another."""
    from batchscore.outputs import resume

    monkeypatch.chdir(tmp_path)
    typed = resume.fingerprint(ScoreConfig(input=("small",), model="ckpt").to_dict(), "sha", None)
    assert typed == resume.fingerprint(ScoreConfig(input=(str(tmp_path / "small"),), model=str(tmp_path / "ckpt")).to_dict(), "sha", None)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert resume.fingerprint(ScoreConfig(input=("small",), model="ckpt").to_dict(), "sha", None) != typed
    assert resume.fingerprint(ScoreConfig(input=("gs://b/small",)).to_dict(), "sha", None)["input"] == ["gs://b/small"]


def test_resume_refuses_inputs_that_changed_since_the_run_started(tmp_path):
    """Parts count inputs by their position in the listing: a folder that gained a file since
    the run started would shift them, so resuming is refused and says why."""
    from batchscore.inputs import listing
    from batchscore.outputs.staging import Staging

    folder = tmp_path / "in"
    small_photos(folder, 5, seed=3)
    config = ScoreConfig(input=(str(folder),), output=str(tmp_path / "out"))
    then = listing.listed(listing_spec(config))
    fingerprint = resume.fingerprint(config.to_dict(), "w", None)
    Staging(config.output, "20261130T000000Z-aaaaaaaa",
            info={"run_id": "r", "fingerprint": fingerprint, "inputs": then.count, "inputs_ids_sha256": then.ids_sha256})
    assert resume.latest(config.output, fingerprint, listing.listed(listing_spec(config))).run_id == "20261130T000000Z-aaaaaaaa"
    first = sorted(folder.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # fixed in place (another size): still the same inputs
    assert resume.latest(config.output, fingerprint, listing.listed(listing_spec(config))).run_id == "20261130T000000Z-aaaaaaaa"
    small_photos(tmp_path / "more", 1, seed=4)
    (tmp_path / "more").rename(folder / "more")  # a sixth image arrives
    with pytest.raises(ResumeError, match=r"its inputs changed since it started \(5 listed then, 6 now"):
        resume.latest(config.output, fingerprint, listing.listed(listing_spec(config)))
    with pytest.raises(ResumeError, match=r"its inputs changed since it started"):
        # what `score` checks before Ray starts
        resume.check_staged(config.output, listing.listed(listing_spec(config)), fingerprint)
