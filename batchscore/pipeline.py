"""The pipeline: the one place where the stages are wired, top to bottom.

    listing → read → decode → predict (+ postprocess) → sink → commit

`build_dataset` wires the Ray Data stages; `score` runs them, streams the results into the
staged Parquet sink on the driver (exact counts, duplicate and loss checks, progress lines)
and commits only a complete run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime as dt
import logging
import platform
import time
import uuid

import ray

from batchscore import decode, listing, models, predict, read, resume, sink
from batchscore.budget import ErrorBudget
from batchscore.config import ScoreConfig
from batchscore.lease import Lease
from batchscore.progress import Progress
from batchscore.result import RunResult
from batchscore.runtime import actor_resources, ensure_ray

log = logging.getLogger("batchscore")


def build_dataset(config: ScoreConfig, model: models.ModelInfo, entries: list[listing.Entry]) -> ray.data.Dataset:
    """The Ray Data plan: rows of {id, labels, probs, error, meta}, one per image."""
    resources = actor_resources(config)
    # Ray Data hands each actor batches of the largest forward size it may choose.
    batch = max(predict.batch_candidates(config.batch_size, on_gpu=resources.gpus > 0))
    # read + decode: plain functions in CPU tasks. Same remote args, so Ray fuses them into one
    # task (bytes stay in the task); different ones from predict, so decode never runs inside
    # the model actor.
    ds = read.dataset(entries, files_per_block=max(batch, 8))
    options = read.ReadOptions(image_column=config.image_column, id_column=config.id_column,
                               passthrough=config.passthrough, retries=config.read_retries,
                               batch_size=config.decode_batch_size)
    ds = ds.map_batches(read.read_batch, fn_kwargs={"options": options}, num_cpus=config.decode_cpus,
                        batch_size=config.decode_batch_size if entries[0].kind == "file" else 1)
    ds = ds.map_batches(
        decode.decode_batch,
        fn_kwargs={"spec": model.preprocess, "max_image_pixels": config.max_image_pixels, "formats": config.formats,
                   "nice": config.decode_nice},
        batch_size=config.decode_batch_size,
        num_cpus=config.decode_cpus,
    )
    # predict + postprocess: a pool of actors, each loading the model once.
    ds = ds.map_batches(
        predict.Predictor,
        fn_constructor_kwargs={"model": model, "device": config.device, "dtype": config.dtype,
                               "top_k": config.top_k, "batch_size": config.batch_size},
        batch_size=batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=config.actors[0], max_size=config.actors[1]),
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
        runtime_env=resources.runtime_env() or None,
    )
    # A bounded object store: without it Ray Data lets decode run ahead into half the store
    # (GBs), and with a slow model a run's memory grew with its image count (ViT-B/16 on
    # 2 cores: +600 MiB PSS from 300 to 3,000 images, docs/benchmarks.md). Set on this
    # dataset's own context: other datasets in the process keep theirs.
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=config.decoded_queue_mb * 2**20 * config.actors[1])
    return ds


def score(config: ScoreConfig) -> RunResult:
    """Scores `config.input` into `config.output` and commits the run.

    Returns:
        The run's result; status "already_committed" (and nothing scored) when the output
        holds a committed run and `config.overwrite` is off.

    Raises:
        ConfigError, ListingError, ModelError: bad settings, inputs or checkpoint.
        OutputBusy: another run holds the output's lease; this one wrote nothing.
        ResumeError: `resume` was asked for but the staged run has other settings.
        ErrorBudgetExceeded: more error rows than `max_error_fraction` allows; nothing is
            committed, `_errors.json` is written beside the staged files.
        SinkError: the output could not be written or the rows do not match the inputs;
            nothing is committed then.
    """
    config.require_io()
    started = time.monotonic()
    started_at = _now()

    previous = sink.read_manifest(config.output)
    if previous is not None and not config.overwrite:
        log.info("output %s already holds committed run %s", config.output, previous["run_id"])
        return _result_from_manifest(previous, config.output, "already_committed")

    # Ray starts (or connects) while the model is resolved and the inputs listed: both mostly
    # wait (on processes, imports, the object store), so together they take the longer of the two.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchscore-prepare") as pool:
        prepared = pool.submit(_prepare, config, started)
        ensure_ray()
        model, entries, resolved, listed = prepared.result()

    attempt = _new_run_id()
    lease = Lease(config.output, attempt).acquire()
    try:
        return _run(config, model, entries, attempt, lease, started, resolved, listed, started_at)
    finally:
        lease.release()


def _prepare(config: ScoreConfig, started: float):
    model = models.resolve(config.model, allow_pickle=config.allow_pickle)
    resolved = time.monotonic()
    log.info("model %s (%s, %d classes) resolved in %.2fs", model.tag, model.model_type, len(model.labels),
             resolved - started)
    entries = listing.list_inputs(config)
    listed = time.monotonic()
    log.info("listed %d inputs in %.2fs", len(entries), listed - resolved)
    return model, entries, resolved, listed


def _run(config: ScoreConfig, model: models.ModelInfo, entries: list[listing.Entry], attempt: str, lease: Lease,
         started: float, resolved: float, listed: float, started_at: str) -> RunResult:
    """Stages (or resumes), scores, checks and commits, holding the output's lease."""
    known_rows = sum(e.rows for e in entries) if all(e.rows is not None for e in entries) else None
    budget = ErrorBudget(config.max_error_fraction, known_rows)
    fingerprint = resume.fingerprint(config, model.weights_sha256)
    staged = resume.latest(config.output, fingerprint) if config.resume else None
    run_id = staged.run_id if staged else attempt
    writer = sink.StagedWriter(config.output, run_id, {"model": model.tag, "run_id": run_id}, config.rows_per_file,
                               passthrough=config.passthrough, part_seconds=config.part_seconds,
                               run_info={"run_id": run_id, "started_at": started_at, "fingerprint": fingerprint},
                               existing=staged.parts if staged else ())
    kept = resume.adopt(staged, writer, entries, budget) if staged else resume.Kept(run_id)
    todo = [e for e in entries if e.id not in kept.complete]
    if config.resume and not staged:
        log.info("resume: no staged run in %s; starting run %s", config.output, run_id)

    seen, sources, container_rows = set(kept.ids), collections.Counter(kept.sources), dict(kept.container_rows)
    progress = Progress(total=None if known_rows is None else known_rows - kept.rows,
                        every_seconds=config.progress_seconds)
    if todo:
        ds = build_dataset(config, model, todo)
        # prefetch_batches=0: Ray's default of 1 held each block back until the next one was
        # ready, so every batch reached the sink one actor call late (ViT-B/16 on 2 cores:
        # first rows 23.5 s after listing instead of 15.9 s).
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            batch, totals = read.unpack_meta(batch, config.passthrough)
            ids, errors = batch.column("id").to_pylist(), batch.column("error").to_pylist()
            seen.update(ids)
            sources.update(batch.column("source").to_pylist())
            container_rows.update(totals)
            budget.add(ids, errors)
            writer.write(batch, totals)
            progress.update(len(ids), len(errors) - errors.count(None))
            lease.renew()
            if budget.blown_early():
                break  # leaving the iterator stops the Ray Data execution
    parts = writer.close()
    scored = time.monotonic()
    log.info("%s", progress.line())
    if budget.blown():
        raise budget.fail(run_id, aborted_early=budget.blown_early(), write=writer.write_text)

    _check_rows(entries, seen, sources, container_rows, sum(p.rows for p in parts))
    timings = {"model_seconds": resolved - started, "listing_seconds": listed - resolved,
               "scoring_seconds": scored - listed, "first_row_seconds": progress.first_row_seconds or 0.0,
               "total_seconds": time.monotonic() - started}
    manifest = _manifest(config, model, entries, run_id, budget, parts, timings, started_at, progress.done)
    manifest["timings"]["steady_images_per_second"] = round(progress.steady_rate, 2)
    manifest["attempt"] = {"id": attempt, "resumed": staged is not None, "rows_kept": kept.rows,
                           "rows_scored": progress.done, "parts_rewritten": kept.parts_rewritten,
                           "parts_discarded": kept.parts_broken}
    sink.commit(writer, manifest, check=lease.check)
    return _result_from_manifest(manifest, config.output, "committed")


def _manifest(config: ScoreConfig, model: models.ModelInfo, entries: list[listing.Entry], run_id: str,
              budget: ErrorBudget, parts: list[sink.PartFile], timings: dict[str, float], started_at: str,
              rows_scored: int) -> dict:
    """Everything a reader or a later run needs to know about this run."""
    scoring = timings["scoring_seconds"]
    return {
        "run_id": run_id,
        "schema": "batchscore.predictions.v1",
        "config": config.to_dict(),
        "model": {"ref": model.ref, "name": model.name, "tag": model.tag, "model_type": model.model_type,
                  "weights_sha256": model.weights_sha256, "weights_format": model.weights_format,
                  "num_labels": len(model.labels), "preprocess": model.preprocess.__dict__},
        "inputs_sha256": listing.listing_hash(entries),
        "counts": {"inputs": len(entries), "input_format": entries[0].kind, "rows": budget.rows,
                   "scored": budget.rows - budget.errors, "errors": budget.errors,
                   "errors_by_code": dict(budget.by_code)},
        "files": [p.__dict__ for p in parts],
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "images_per_second": round(rows_scored / scoring, 2) if scoring > 0 else 0.0},
        "started_at": started_at,
        "finished_at": _now(),
        "versions": _versions(),
    }


def _check_rows(entries: list[listing.Entry], seen: set[str], sources: collections.Counter,
                container_rows: dict[str, int], rows: int) -> None:
    """One row per image, every row from a listed input, or the run fails before commit.

    Files and Parquet rows are known in advance and must match exactly; a tar shard or
    request file must match the row count its reader announced with its last row.
    """
    problems = []
    if rows != len(seen):
        problems.append(f"{rows - len(seen)} duplicate ids")
    listed = {e.id for e in entries}
    unlisted = sorted(set(sources) - listed)
    if unlisted:
        problems.append(f"rows from unlisted inputs, e.g. {unlisted[:3]}")
    expected = {e.id: e.rows if e.rows is not None else container_rows.get(e.id) for e in entries}
    wrong = [(e.id, sources.get(e.id, 0), expected[e.id]) for e in entries
             if (expected[e.id] is not None or e.id in sources) and sources.get(e.id, 0) != expected[e.id]]
    if wrong:
        problems.append(f"{len(wrong)} input(s) gave the wrong number of rows (input, got, expected), e.g. {wrong[:3]}")
    if problems:
        known = sum(e.rows or 0 for e in entries)
        raise sink.SinkError(f"expected one row per input ({len(entries)} inputs, {known} rows known in advance) "
                             f"but wrote {rows} rows: {'; '.join(problems)}; nothing was committed")
    empty = [e.id for e in entries if expected[e.id] is None and not sources.get(e.id)]
    if empty:
        log.warning("%d input file(s) held no image rows: %s", len(empty), empty[:5])


def _result_from_manifest(manifest: dict, output: str, status: str) -> RunResult:
    from batchscore import fs as fsutil

    counts, timings = manifest["counts"], manifest["timings"]
    fs, root = fsutil.resolve(output)
    return RunResult(
        status=status,
        run_id=manifest["run_id"],
        output=output,
        manifest_uri=fsutil.full_uri(fs, f"{root.rstrip('/')}/{sink.MANIFEST}"),
        rows=counts["rows"],
        errors=counts["errors"],
        errors_by_code=dict(counts["errors_by_code"]),
        files=tuple(f["name"] for f in manifest["files"]),
        seconds=timings["total_seconds"],
        images_per_second=timings["images_per_second"],
    )


def _new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("batchscore", "ray", "torch", "transformers", "pyarrow", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out
