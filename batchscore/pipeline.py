"""The pipeline: the one place where the stages are wired, top to bottom.

    driver    prepare: check the checkpoint's files and list the inputs (no cluster: a bad
              job fails in about a second); take the output's lease; start Ray while the
              checkpoint's weights are hashed; stage a new run, or resume one
    workers   read → decode → predict (+ postprocess) → write       (`build_dataset`)
    driver    count each part's statistics (budget, progress, rows) → check rows against
              the inputs → write the manifest → commit

The driver plans and commits; workers read, decode, score and write. What reaches the driver
is one small record per part file (`batchscore.run`), never the rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import json
import logging
import platform
import time
import uuid

import ray

from batchscore import decode, evaluation, listing, models, output, postprocess, predict, read, report, resume, write
from batchscore import device_decode, drift, feed
from batchscore.commit import commit
from batchscore.config import ScoreConfig
from batchscore.lease import Lease
from batchscore.result import RunResult
from batchscore.run import Run
from batchscore.runtime import (WRITE_CPUS, WRITE_RUNTIME_ENV, ActorResources, actor_resources, ensure_ray,
                                sigterm_kept)
from batchscore.staging import Staging

log = logging.getLogger("batchscore")

# Files per read/decode task after the first blocks (see `read.dataset`). Measured with the
# demo model on 2 cores (docs/benchmarks.md): per-task cost on the driver dominated at 32.
FILES_PER_BLOCK = 256


def build_dataset(config: ScoreConfig, model: models.ModelInfo, inputs: listing.Listing, todo, part: write.PartSpec,
                  resources: ActorResources | None = None) -> ray.data.Dataset:
    """The Ray Data plan: rows of {part} (one part file's statistics as JSON) per part written.

    `inputs` is the run's listing, written to its staging folder (`Listing.write`); `todo` a
    bool per input still to score (None: all); `resources` the inference actors' (None: sized
    here, `actor_resources`)."""
    resources = resources or actor_resources(config)
    batch = model_batch(config, resources.gpus)
    # read + decode: plain functions in CPU tasks. Same remote args, so Ray fuses them into one
    # task (bytes stay in the task); different ones from predict, so decode never runs inside
    # the model actor. One read task per row group of the listing shards (`task_bounds`).
    ds = read.dataset(inputs, todo)
    options = read.ReadOptions(image_column=config.image_column, id_column=config.id_column,
                               passthrough=config.passthrough, retries=config.read_retries,
                               batch_size=config.decode_batch_size)
    ds = ds.map_batches(read.read_batch, fn_kwargs={"options": options}, num_cpus=config.decode_cpus,
                        batch_size=None)
    # decode_device cuda/torchvision: the CPU tasks check headers and pass JPEGs on as bytes,
    # the actor decodes them on its device (batchscore.device_decode).
    decode_device = device_decode.resolve(config.decode_device, resources.gpus)
    ds = ds.map_batches(
        decode.decode_batch if decode_device == "cpu" else device_decode.check_batch,
        fn_kwargs={"spec": model.preprocess, "max_image_pixels": config.max_image_pixels, "formats": config.formats,
                   "nice": config.decode_nice},
        # None: each batch read_batch yields (decode_batch_size rows). A batch size here would
        # also bundle the read tasks' inputs (one row each) until it is met: every task in one.
        batch_size=None,
        num_cpus=config.decode_cpus,
    )
    # predict + postprocess: a pool of actors, each loading the model once.
    ds = ds.map_batches(
        predict.Predictor,
        fn_constructor_kwargs={"model": model, "device": config.device, "dtype": config.dtype,
                               "top_k": config.top_k, "batch_size": config.batch_size,
                               "task": models.task_spec(config, model),  # issue 17: classify / embed
                               # issue 19: JPEGs decoded in the actor, copies overlapped, torch.compile
                               "feeding": feed.FeedOptions(
                                   decode_on_device=decode_device != "cpu", max_image_pixels=config.max_image_pixels,
                                   formats=config.formats, compile=config.compile, decode_cpus=config.decode_cpus,
                                   decode_device=decode_device),
                               # issue 18: per-label thresholds of a sigmoid head (None: softmax)
                               "thresholds": postprocess.run_thresholds(config, model.labels, model.multi_label)},
        batch_size=batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=config.actors[0], max_size=config.actors[1]),
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
        runtime_env=resources.runtime_env() or None,
    )
    # write: tasks that each write one part file of `rows_per_file` rows into the run's
    # staging folder and return its statistics; the rows never reach the driver. With more than
    # one part, in workers of their own (WRITE_RUNTIME_ENV), so the few that decode are the only
    # ones importing torch; a run of one part has one write task, which takes an idle worker
    # (a worker of its own would cost its start, ~0.5 s of a 10-image run on 2 cores).
    per_file = rows_per_file(config, resources.gpus)
    one_part = inputs.known_rows is not None and inputs.known_rows <= per_file  # None: containers of unknown size
    ds = ds.map_batches(write.write_part, fn_kwargs={"spec": part}, batch_size=per_file, batch_format="pyarrow",
                        num_cpus=WRITE_CPUS, runtime_env=None if one_part else WRITE_RUNTIME_ENV)
    # A bounded object store: without it Ray Data lets decode run ahead into half the store
    # (GBs), and with a slow model a run's memory grew with its image count (ViT-B/16 on
    # 2 cores: +600 MiB PSS from 300 to 3,000 images, docs/benchmarks.md). Set on this
    # dataset's own context: other datasets in the process keep theirs.
    # At least three actor batches per actor (a GPU's 1,024 images are 147 MiB), or it starves.
    queue_mb = feed.queue_mb(config.decoded_queue_mb, batch, model.preprocess.output_hw)
    if queue_mb > config.decoded_queue_mb:
        log.info("decoded_queue_mb raised from %d to %d: three batches of %d images per actor", config.decoded_queue_mb,
                 queue_mb, batch)
    # Ray Data's issue detectors (hash shuffles, which a run has none of; a task's memory, which
    # warned about the write tasks' ~600 MB of imports with a `memory=` a user cannot act on).
    ds.context.issue_detectors_config = dataclasses.replace(ds.context.issue_detectors_config, detectors=[])
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=queue_mb * 2**20 * config.actors[1])
    return ds


def model_batch(config: ScoreConfig, gpus: float) -> int:
    """Rows per actor call: the largest forward batch size the actor may choose."""
    memory = feed.accelerator_memory_gib(ray.cluster_resources()) if gpus > 0 and config.batch_size is None else None
    return max(predict.batch_candidates(config.batch_size, on_gpu=gpus > 0, gpu_memory_gib=memory))


def task_bounds(config: ScoreConfig, inputs: listing.Listing, resources: ActorResources | None = None) -> list[int]:
    """Listing indexes where read tasks start and end (`read.task_bounds`)."""
    batch = max(model_batch(config, (resources or actor_resources(config)).gpus), 8)
    return read.task_bounds(inputs.count, inputs.kind != "file", batch,
                            files_per_block(inputs.count, batch, config.actors[1]))


def files_per_block(files: int, batch: int, actors: int) -> int:
    """Files per read/decode task after the first blocks: FILES_PER_BLOCK, but at most a
    quarter of each actor's share, so a small run still spreads over every actor (one block
    of 208 files went to one of two actors), and never below one model batch."""
    return max(batch, min(FILES_PER_BLOCK, files // (4 * actors)))


def rows_per_file(config: ScoreConfig, gpus: float) -> int:
    """Rows per part file: `rows_per_file`, or 20,000 with GPUs (seconds of work there) and
    2,000 on CPUs (minutes of a ViT-B/16 on a few cores: what a crash may lose to --resume)."""
    if config.rows_per_file is not None:
        return config.rows_per_file
    return 20_000 if gpus > 0 else 2_000


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

    previous = output.read_manifest(config.output)
    if previous is not None and not config.overwrite:
        log.info("output %s already holds committed run %s", config.output, previous["run_id"])
        changed = resume.differences(previous.get("config", {}), config)
        if changed:
            from batchscore.progress import overwrite_hint  # in the caller's terms: --overwrite or overwrite=True

            log.warning("the committed run was made with other settings (%s); its rows stand: pass %s to score "
                        "again with these", "; ".join(f"{k}: {a!r}, now {b!r}" for k, (a, b) in changed.items()),
                        overwrite_hint())
        return _result_from_manifest(previous, config.output, "already_committed")

    # Everything that needs no cluster is checked first, so a bad job fails in about a
    # second, not after Ray started (5-50 s): the checkpoint's files are read, the inputs listed.
    inputs, checked, timings = _prepare(config)
    if config.resume:
        resume.check_inputs(config.output, inputs)  # inputs changed since the staged run began: exit 2 now
    models.task_for(config.task, checked)  # issue 17: classification of a headless checkpoint is a bad job
    _, note = models.top_k_used(config.top_k, checked.labels)
    # issue 18: a bad thresholds or labels file is a bad job, found before Ray starts
    postprocess.run_thresholds(config, checked.labels, checked.multi_label)
    evaluation.spec_for(config, checked.labels, checked.multi_label)
    drift.check_baseline(config)  # a named baseline without a committed run is a bad job, not "no drift"
    if note:
        log.warning("%s", note)

    # The output's lease, before Ray starts: a busy output (exit 5) or one that cannot be
    # written says so at once.
    attempt = _new_run_id()
    lease = Lease(config.output, attempt).acquire()
    try:
        # Ray starts (or connects) while the model is resolved (its weights hashed: ~1 s for a
        # ViT-B/16; no transformers, no torch) and Ray Data imported: Ray's start mostly waits
        # on the processes it starts, the hashing on the disk.
        def resolve():
            begun = time.monotonic()
            model = models.resolve(config.model, allow_pickle=config.allow_pickle, model_arch=config.model_arch)
            seconds = time.monotonic() - begun
            import ray.data  # noqa: F401  (its ~0.35 s of imports while Ray starts, not after)

            return model, seconds

        # SIGTERM waits while Ray starts (`sigterm_kept`), also in the thread that resolves.
        with sigterm_kept(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchscore-prepare") as pool:
            resolving = pool.submit(resolve)
            ensure_ray()
            model, timings["model_seconds"] = resolving.result()
        log.info("model %s (%s, %d classes) resolved in %.2fs", model.tag, model.model_type, len(model.labels),
                 timings["model_seconds"])
        return _run(config, model, inputs, attempt, lease, timings, started, started_at)
    finally:
        lease.release()


def _prepare(config: ScoreConfig):
    """The checks that need no cluster: the checkpoint's files (milliseconds), then the
    listing of the inputs (one request for a manifest, more for folders of a bucket).

    Returns:
        (the listing, the checkpoint's files, timings).

    Raises:
        ModelError, ListingError: before Ray starts and before anything is staged.
    """
    begun = time.monotonic()
    checked = models.check(config.model, allow_pickle=config.allow_pickle, model_arch=config.model_arch)
    checked_at = time.monotonic()
    log.info("checkpoint %s checked in %.2fs", checked.summary(), checked_at - begun)
    inputs = listing.listed(config)
    timings = {"check_seconds": checked_at - begun, "listing_seconds": time.monotonic() - checked_at}
    log.info("listed %d inputs in %.2fs", inputs.count, timings["listing_seconds"])
    return inputs, checked, timings


def _run(config: ScoreConfig, model: models.ModelInfo, inputs: listing.Listing, attempt: str, lease: Lease,
         timings: dict[str, float], started: float, started_at: str) -> RunResult:
    """Stages (or resumes), scores, checks and commits, holding the output's lease."""
    resources = actor_resources(config)  # sizes that fit no node are a bad job: raised before anything is staged
    fingerprint = resume.fingerprint(config, model.weights_sha256)
    staged = resume.latest(config.output, fingerprint, inputs) if config.resume else None
    if config.resume and not staged:
        log.info("resume: no staged run in %s; starting run %s", config.output, attempt)
    run_id = staged.run_id if staged else attempt
    staging = Staging(config.output, run_id,
                      info=None if staged else {"run_id": run_id, "started_at": started_at, "fingerprint": fingerprint,
                                                "inputs": inputs.count, "inputs_ids_sha256": inputs.ids_sha256})
    # The listing goes to the staging folder, one row group per read task; the driver drops it.
    inputs.write(staging.fs, staging.listing_dir, task_bounds(config, inputs, resources))
    run = Run(run_id, inputs, staging, lease, config.max_error_fraction, config.progress_seconds)
    todo = resume.adopt(staged, run) if staged else None

    scoring = time.monotonic()
    if todo is None or todo.any():
        task = models.task_spec(config, model)  # issue 17: schema v2 (`embedding`) when the task embeds
        part = write.PartSpec(output=config.output, run_id=run_id, model=model.tag, passthrough=config.passthrough,
                              containers=run.containers, task=task.task, embed_dim=task.dim, embed_dtype=task.dtype,
                              evaluate=evaluation.spec_for(config, model.labels, model.multi_label))  # issue 18
        # prefetch_batches=0: each part's record is counted as soon as it is written.
        parts = build_dataset(config, model, inputs, todo, part, resources).iter_batches(
            batch_format="pyarrow", batch_size=None, prefetch_batches=0)
        report.prepare()  # its imports while the workers score, not after the commit
        # The lease renewed and a progress line every progress_seconds, both from threads: one
        # part may take minutes to come.
        with run.lease.held(), run.progress.ticking():
            for batch in parts:
                for stats in batch.column("part").to_pylist():
                    run.add(json.loads(stats))
                if run.budget.blown_early():
                    # leaving the loop drops its iterator, whose close shuts Ray Data's execution
                    # down (actors and their CPUs freed: tests/test_budget.py checks)
                    break
    timings["scoring_seconds"] = time.monotonic() - scoring
    run.progress.finish()  # the final progress line, once; closes a notebook's bar
    if run.budget.blown():
        early = run.budget.blown_early() and run.rows < (run.budget.expected or 0)
        raise run.budget.fail(run_id, aborted_early=early, write=staging.write_text)

    run.check()
    timings["first_row_seconds"] = run.progress.first_row_seconds or 0.0
    timings["total_seconds"] = time.monotonic() - started
    manifest = _manifest(config, model, run, timings, started_at, resumed=staged is not None, attempt=attempt)
    commit(staging, [p["name"] for p in run.parts], manifest, check=lease.check)
    try:
        report.after_commit(config)  # issue 18: _report.html beside the manifest (a failure only logs)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI's handler exits 15): the run is
        # committed, so say so and return it, not "stopped, nothing committed"
        log.warning("interrupted while writing %s: the run is committed; `batchscore report %s` writes it",
                    output.REPORT, config.output)
    return _result_from_manifest(manifest, config.output, "committed")


def _manifest(config: ScoreConfig, model: models.ModelInfo, run: Run, timings: dict[str, float], started_at: str,
              resumed: bool, attempt: str) -> dict:
    """Everything a reader or a later run needs to know about this run."""
    scoring, scored = timings["scoring_seconds"], run.progress.done
    budget = run.budget
    return {
        "run_id": run.run_id,
        "schema": output.schema_name(models.task_for(config.task, model)),
        "config": config.to_dict(),
        "model": {"ref": model.ref, "name": model.name, "tag": model.tag, "model_type": model.model_type,
                  "weights_sha256": model.weights_sha256, "weights_format": model.weights_format,
                  "num_labels": len(model.labels), "preprocess": model.preprocess.__dict__,
                  "layout": model.layout, "architecture": model.architecture},
        "task": models.task_spec(config, model).__dict__,  # task; pool, normalize, dtype, dim of an embedding
        # labels per row written: config top_k, capped at the checkpoint's classes (0 = all)
        "top_k": models.top_k_used(config.top_k, model.labels)[0],
        "inputs_sha256": run.listing.sha256,
        "counts": {"inputs": run.listing.count, "input_format": run.listing.format, "rows": budget.rows,
                   "scored": budget.rows - budget.errors, "errors": budget.errors,
                   "errors_by_code": dict(budget.by_code)},
        "files": run.part_files(),
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "images_per_second": round(scored / scoring, 2) if scoring > 0 else 0.0,
                    "steady_images_per_second": round(run.progress.steady_rate, 2)},
        "attempt": {"id": attempt, "resumed": resumed, "rows_kept": run.kept_rows, "rows_scored": scored,
                    "parts_rewritten": run.rewritten, "parts_discarded": run.discarded},
        "started_at": started_at,
        "finished_at": _now(),
        "versions": _versions(),
        # issue 18: scores (top-1 histogram, confidence, timeline), evaluation, thresholds
        **evaluation.manifest_sections(run.parts, model.labels, models.top_k_used(config.top_k, model.labels)[0],
                                       postprocess.run_thresholds(config, model.labels, model.multi_label),
                                       evaluation.spec_for(config, model.labels, model.multi_label)),
    }


def _result_from_manifest(manifest: dict, output_uri: str, status: str) -> RunResult:
    from batchscore import fs as fsutil

    counts, timings = manifest["counts"], manifest["timings"]
    fs, root = fsutil.resolve(output_uri)
    return RunResult(
        status=status,
        run_id=manifest["run_id"],
        output=output_uri,
        manifest_uri=fsutil.full_uri(fs, f"{root.rstrip('/')}/{output.MANIFEST}"),
        rows=counts["rows"],
        errors=counts["errors"],
        errors_by_code=dict(counts["errors_by_code"]),
        files=tuple(f["name"] for f in manifest["files"]),
        seconds=timings["total_seconds"],
        images_per_second=timings["images_per_second"],
        evaluation=manifest.get("evaluation"),  # issue 18
    )


def _new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    # The packages that decide what a row holds (constraints.txt pins them all, as tested).
    for pkg in ("batchscore", "ray", "torch", "torchvision", "transformers", "safetensors", "pyarrow", "pillow",
                "pillow-heif", "numpy", "fsspec", "gcsfs", "s3fs"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out
