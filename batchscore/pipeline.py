"""The pipeline: the one place where the stages are wired, top to bottom.

    driver    plan: resolve the job once, without a cluster (`plan.prepare`: the checkpoint's
              files, the listing, task, thresholds, labels; a bad job fails in about a
              second); take the output's lease; start Ray while the checkpoint's weights are
              hashed; size the actors and resolve each stage's spec (`plan.physical`); stage
              a new run, or resume one
    workers   read → decode → predict (+ postprocess) → write       (`build_dataset`)
    driver    count each part's statistics (budget, progress, rows) → check rows against
              the inputs → write the manifest (with the plan) → commit

The driver plans and commits; workers read, decode, score and write. What reaches the driver
is one small record per part file (`batchscore.driver.run`), never the rows.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import importlib.metadata as md
import json
import logging
import platform
import time
import uuid

import ray

from batchscore import plan
from batchscore.checkpoints import models
from batchscore.config import ScoreConfig
from batchscore.decoding import decode, device_decode
from batchscore.driver.progress import overwrite_hint
from batchscore.driver.run import Run
from batchscore.driver.runtime import WRITE_CPUS, WRITE_RUNTIME_ENV, actor_resources, ensure_ray, sigterm_kept
from batchscore.inference import predict
from batchscore.inputs import fs as fsutil
from batchscore.inputs import read
from batchscore.inputs.listing import Listing
from batchscore.outputs import output, resume, write
from batchscore.outputs.commit import commit
from batchscore.outputs.lease import Lease
from batchscore.outputs.result import RunResult
from batchscore.outputs.staging import Staging
from batchscore.reporting import evaluation, report

log = logging.getLogger("batchscore")


@dataclasses.dataclass
class Attempt:
    """This attempt at a run: its id (the run's, unless a staged run is resumed), when it
    began (`time.monotonic()`, and as ISO 8601 UTC) and its timings in seconds."""

    id: str = dataclasses.field(default_factory=lambda: _new_run_id())
    started: float = dataclasses.field(default_factory=time.monotonic)
    started_at: str = dataclasses.field(default_factory=lambda: _now())
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


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
    attempt = Attempt()

    previous = output.read_manifest(config.output)
    if previous is not None and not config.overwrite:
        log.info("output %s already holds committed run %s", config.output, previous["run_id"])
        changed = resume.differences(previous.get("config", {}), config.to_dict())
        if changed:
            log.warning("the committed run was made with other settings (%s); its rows stand: pass %s to score "
                        "again with these", "; ".join(f"{k}: {a!r}, now {b!r}" for k, (a, b) in changed.items()),
                        overwrite_hint())
        return _result_from_manifest(previous, config.output, "already_committed")

    # Plan: everything that needs no cluster is resolved first (the checkpoint's files, the
    # listing, task, thresholds, labels, baseline), so a bad job fails in about a second, not
    # after Ray started (5-50 s).
    job = plan.prepare(config)
    attempt.timings.update(check_seconds=job.check_seconds, listing_seconds=job.listing_seconds)

    # The output's lease, before Ray starts: a busy output (exit 5) or one that cannot be
    # written says so at once.
    lease = Lease(config.output, attempt.id).acquire()
    try:
        # Ray starts (or connects) while the model is resolved (its weights hashed: ~1 s for a
        # ViT-B/16; no transformers, no torch) and Ray Data imported: Ray's start mostly waits
        # on the processes it starts, the hashing on the disk.
        def resolve():
            begun = time.monotonic()
            model = models.resolve(config.model, allow_pickle=config.allow_pickle, model_arch=config.model_arch)
            seconds = time.monotonic() - begun
            import ray.data  # noqa: F401  (lazy: its ~0.35 s of imports while Ray starts, not after)

            return model, seconds

        # SIGTERM waits while Ray starts (`sigterm_kept`), also in the thread that resolves.
        with sigterm_kept(), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batchscore-prepare") as pool:
            resolving = pool.submit(resolve)
            ensure_ray()
            model, attempt.timings["model_seconds"] = resolving.result()
        log.info("model %s (%s, %d classes) resolved in %.2fs", model.tag, model.model_type, len(model.labels),
                 attempt.timings["model_seconds"])
        # Sizes that fit no node are a bad job: raised here, before anything is staged.
        resources = actor_resources(plan.actor_spec(config))
        run_plan = plan.physical(config, job, model, ray.cluster_resources(), resources)
        return _run(config, run_plan, lease, attempt)
    finally:
        lease.release()


def _run(config: ScoreConfig, run_plan: plan.RunPlan, lease: Lease, attempt: Attempt) -> RunResult:
    """Stages (or resumes), scores, checks and commits, holding the output's lease."""
    job, inputs = run_plan.job, run_plan.job.inputs
    fingerprint = run_plan.fingerprint()
    staged = resume.latest(config.output, fingerprint, inputs) if config.resume else None
    if config.resume and not staged:
        log.info("resume: no staged run in %s; starting run %s", config.output, attempt.id)
    run_id = staged.run_id if staged else attempt.id
    staging = Staging(config.output, run_id,
                      info=None if staged else {"run_id": run_id, "started_at": attempt.started_at,
                                                "fingerprint": fingerprint,
                                                "inputs": inputs.count, "inputs_ids_sha256": inputs.ids_sha256})
    # The listing goes to the staging folder, one row group per read task; the driver drops it.
    inputs.write(staging.fs, staging.listing_dir, run_plan.task_bounds())
    run = Run(run_id, inputs, staging, lease, config.max_error_fraction, config.progress_seconds)
    todo = resume.adopt(staged, run) if staged else None

    scoring = time.monotonic()
    if todo is None or todo.any():
        task = run_plan.predict.task  # schema v2 (`embedding`) when the task embeds
        part = write.PartSpec(output=config.output, run_id=run_id, model=run_plan.model.tag,
                              passthrough=config.passthrough, containers=run.containers, task=task.task,
                              embed_dim=task.dim, embed_dtype=task.dtype, evaluate=job.evaluation)
        # prefetch_batches=0: each part's record is counted as soon as it is written.
        parts = build_dataset(run_plan, inputs, todo, part).iter_batches(
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
    timings = attempt.timings
    timings["scoring_seconds"] = time.monotonic() - scoring
    run.progress.finish()  # the final progress line, once; closes a notebook's bar
    if run.budget.blown():
        early = run.budget.blown_early() and run.rows < (run.budget.expected or 0)
        raise run.budget.fail(run_id, aborted_early=early, write=staging.write_text)

    run.check()
    timings["first_row_seconds"] = run.progress.first_row_seconds or 0.0
    timings["total_seconds"] = time.monotonic() - attempt.started
    manifest = _manifest(run_plan, run, attempt, resumed=staged is not None)
    commit(staging, [p["name"] for p in run.parts], manifest, check=lease.check)
    try:
        report.after_commit(config.output, config.baseline, job.drift)  # _report.html (a failure only logs)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (the CLI's handler exits 15): the run is
        # committed, so say so and return it, not "stopped, nothing committed"
        log.warning("interrupted while writing %s: the run is committed; `batchscore report %s` writes it",
                    output.REPORT, config.output)
    return _result_from_manifest(manifest, config.output, "committed")


def build_dataset(run_plan: plan.RunPlan, inputs: Listing, todo, part: write.PartSpec) -> ray.data.Dataset:
    """The Ray Data plan: rows of {part} (one part file's statistics as JSON) per part written.

    `inputs` is the run's listing, written to its staging folder (`Listing.write`); `todo` a
    bool per input still to score (None: all)."""
    resources, decoding = run_plan.resources, run_plan.decode
    # read + decode: plain functions in CPU tasks. Same remote args, so Ray fuses them into one
    # task (bytes stay in the task); different ones from predict, so decode never runs inside
    # the model actor. One read task per row group of the listing shards (`task_bounds`).
    ds = read.dataset(inputs, todo)
    ds = ds.map_batches(read.read_batch, fn_kwargs={"options": run_plan.read}, num_cpus=decoding.cpus,
                        batch_size=None)
    # decode_device cuda/torchvision: the CPU tasks check headers and pass JPEGs on as bytes,
    # the actor decodes them on its device (batchscore.decoding.device_decode).
    ds = ds.map_batches(
        decode.decode_batch if decoding.device == "cpu" else device_decode.check_batch,
        fn_kwargs=decoding.kwargs(),
        # None: each batch read_batch yields (decode_batch_size rows). A batch size here would
        # also bundle the read tasks' inputs (one row each) until it is met: every task in one.
        batch_size=None,
        num_cpus=decoding.cpus,
    )
    # predict + postprocess: a pool of actors, each loading the model once.
    ds = ds.map_batches(
        predict.Predictor,
        fn_constructor_kwargs={"model": run_plan.model, "spec": run_plan.predict},
        batch_size=run_plan.batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=run_plan.actors[0], max_size=run_plan.actors[1]),
        num_cpus=resources.cpus,
        num_gpus=resources.gpus,
        runtime_env=resources.runtime_env() or None,
    )
    # write: tasks that each write one part file of `rows_per_file` rows into the run's
    # staging folder and return its statistics; the rows never reach the driver. With more than
    # one part, in workers of their own (WRITE_RUNTIME_ENV), so the few that decode are the only
    # ones importing torch; a run of one part has one write task, which takes an idle worker
    # (a worker of its own would cost its start, ~0.5 s of a 10-image run on 2 cores).
    ds = ds.map_batches(write.write_part, fn_kwargs={"spec": part}, batch_size=run_plan.rows_per_file,
                        batch_format="pyarrow", num_cpus=WRITE_CPUS,
                        runtime_env=None if run_plan.one_part else WRITE_RUNTIME_ENV)
    # A bounded object store: without it Ray Data lets decode run ahead into half the store
    # (GBs), and with a slow model a run's memory grew with its image count (ViT-B/16 on
    # 2 cores: +600 MiB PSS from 300 to 3,000 images, docs/benchmarks.md). Set on this
    # dataset's own context: other datasets in the process keep theirs. At least three actor
    # batches per actor (`feed.queue_mb`: a GPU's 1,024 images are 147 MiB), or it starves.
    # Ray Data's issue detectors are off: they watch for hash shuffles, which a run has none
    # of, and a task's memory, where they warned about the write tasks' ~600 MB of imports
    # with a `memory=` a user cannot act on.
    ds.context.issue_detectors_config = dataclasses.replace(ds.context.issue_detectors_config, detectors=[])
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=run_plan.queue_mb * 2**20 * run_plan.actors[1])
    return ds


def _manifest(run_plan: plan.RunPlan, run: Run, attempt: Attempt, resumed: bool) -> dict:
    """Everything a reader or a later run needs to know about this run."""
    timings = attempt.timings
    scoring, scored = timings["scoring_seconds"], run.progress.done
    budget, model, job = run.budget, run_plan.model, run_plan.job
    return {
        "run_id": run.run_id,
        "schema": output.schema_name(run_plan.predict.task.task),
        "config": job.settings,
        "plan": run_plan.to_dict(),  # what decided the rows: each stage's spec, the sizes between them
        "model": {"ref": model.ref, "name": model.name, "tag": model.tag, "model_type": model.model_type,
                  "weights_sha256": model.weights_sha256, "weights_format": model.weights_format,
                  "num_labels": len(model.labels), "preprocess": model.preprocess.__dict__,
                  "layout": model.layout, "architecture": model.architecture},
        "task": run_plan.predict.task.__dict__,  # task; pool, normalize, dtype, dim of an embedding
        # labels per row written: config top_k, capped at the checkpoint's classes (0 = all)
        "top_k": job.top_k,
        "inputs_sha256": run.listing.sha256,
        "counts": {"inputs": run.listing.count, "input_format": run.listing.format, "rows": budget.rows,
                   "scored": budget.rows - budget.errors, "errors": budget.errors,
                   "errors_by_code": dict(budget.by_code)},
        "files": run.part_files(),
        "timings": {**{k: round(v, 3) for k, v in timings.items()},
                    "images_per_second": round(scored / scoring, 2) if scoring > 0 else 0.0,
                    "steady_images_per_second": round(run.progress.steady_rate, 2)},
        "attempt": {"id": attempt.id, "resumed": resumed, "rows_kept": run.kept_rows, "rows_scored": scored,
                    "parts_rewritten": run.rewritten, "parts_discarded": run.discarded},
        "started_at": attempt.started_at,
        "finished_at": _now(),
        "versions": _versions(),
        # scores (top-1 histogram, confidence, timeline), evaluation, thresholds
        **evaluation.manifest_sections(run.parts, model.labels, job.top_k, job.thresholds, job.evaluation),
    }


def _result_from_manifest(manifest: dict, output_uri: str, status: str) -> RunResult:
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
        evaluation=manifest.get("evaluation"),
    )


def _new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    # The packages that decide what a row holds (constraints.txt pins them all, as tested).
    for pkg in ("batchscore", "ray", "torch", "torchvision", "transformers", "safetensors", "pyarrow", "pillow",
                "pillow-heif", "numpy", "fsspec", "gcsfs", "s3fs"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "?"
    return out
