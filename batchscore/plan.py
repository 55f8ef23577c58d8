"""The plan: a job's settings resolved once, on the driver, before anything runs.

    ScoreConfig ──prepare──▶ JobPlan   no cluster: the checkpoint's files, the listing, the
                                       task, labels per row, thresholds, evaluation, drift
                                       (every settings file read once; a bad job fails here,
                                       in about a second, for `score` and `validate` alike)
                ──physical─▶ RunPlan   Ray up: the resolved model, the actors' resources and
                                       each stage's spec (read, decode, predict), the batch,
                                       part and queue sizes

This module and `batchscore.pipeline` are the places that read a run's `ScoreConfig`; every
stage gets only its own spec (`listing.ListingSpec`, `read.ReadOptions`, `decode.DecodeSpec`,
`predict.PredictSpec`, `write.PartSpec`, `runtime.ActorSpec`). The manifest records the
plan (`RunPlan.to_dict`), and resume's fingerprint is computed from it.

`preflight` runs the checks behind `prepare` one by one and keeps each outcome, so
`batchscore validate` reports all of them from the same code that refuses a `score`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from batchscore.checkpoints import models
from batchscore.checkpoints.checkpoint import CheckpointFiles, ModelInfo
from batchscore.config import ScoreConfig
from batchscore.decoding import device_decode
from batchscore.decoding.decode import DecodeSpec
from batchscore.exceptions import ConfigError, ListingError, ModelError, ResumeError
from batchscore.inference import feed, postprocess
from batchscore.inference.postprocess import Thresholds
from batchscore.inference.predict import PredictSpec, batch_candidates
from batchscore.inputs.listing import Listing, ListingSpec, listed
from batchscore.reporting import drift, evaluation
from batchscore.reporting.evaluation import EvalSpec

if TYPE_CHECKING:  # these import ray (~0.3 s), which `validate` does without
    from batchscore.driver.runtime import ActorResources, ActorSpec
    from batchscore.inputs.read import ReadOptions

log = logging.getLogger("batchscore")

# Files per read/decode task after the first blocks (see `read.dataset`). Measured with the
# demo model on 2 cores (docs/benchmarks.md): per-task cost on the driver dominated at 32.
FILES_PER_BLOCK = 256
# Rows per part file when `rows_per_file` is unset: seconds of work on a GPU; minutes of a
# ViT-B/16 on a few CPU cores, which is what a crash may lose to --resume.
GPU_ROWS_PER_FILE = 20_000
CPU_ROWS_PER_FILE = 2_000
# The refusals a job's checks make: a bad job (exit 2), said by `validate` and raised by `score`.
BAD_JOB = (ConfigError, ListingError, ModelError, ResumeError)


# -- the checks that need no cluster ---------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One preflight check's outcome: its `value`, or the `error` it raised, or why it was
    `skipped` (a check it needs failed, or the job is a dated template)."""

    name: str
    value: Any = None
    error: Exception | None = None
    skipped: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class JobPlan:
    """A job resolved without a cluster: what `validate` checks and `score` starts from.

    Attributes:
        settings: The config as recorded in the manifest (`ScoreConfig.to_job`: local paths
            absolute, so a re-run from another folder compares like with like).
        checkpoint: The checkpoint's files, read without transformers (`models.check`).
        inputs: The listing of the inputs.
        task: classify, embed or classify+embed (auto resolved against the checkpoint).
        top_k: Labels per row: `top_k` capped at the checkpoint's classes (0 = all; 0 headless).
        thresholds: A sigmoid head's thresholds (the file read once); None for a softmax head.
        evaluation: Where ground truth comes from (a labels file read once); None without.
        baseline_run: The run id committed in the baseline; None without one.
        drift: The drift thresholds of the report.
        check_seconds, listing_seconds: How long the checkpoint's check and the listing took.
    """

    settings: dict
    checkpoint: CheckpointFiles
    inputs: Listing
    task: str
    top_k: int
    thresholds: Thresholds | None
    evaluation: EvalSpec | None
    baseline_run: str | None
    drift: drift.Thresholds
    check_seconds: float = 0.0
    listing_seconds: float = 0.0

    @property
    def thresholds_sha256(self) -> str | None:
        """sha256 of the thresholds file (None without one): it decides which labels a row holds."""
        return self.thresholds.sha256 if self.thresholds else None

    def fingerprint(self, weights_sha256: str) -> dict:
        """What a staged run must share with this one to be resumed (`resume.fingerprint`)."""
        # lazy: resume imports the write stage and ray, which `validate` does without
        from batchscore.outputs import resume

        return resume.fingerprint(self.settings, weights_sha256, self.thresholds_sha256)


def preflight(config: ScoreConfig, *, keep_going: bool = False) -> dict[str, Check]:
    """Runs the checks a job needs before Ray starts, in order: model, inputs, task,
    thresholds, staged run (with `resume`: its inputs and settings), label source, baseline.

    Args:
        keep_going: Run every check even after one failed (`validate`); otherwise stop at the
            first failure (`score`: a listing of a bucket is not made for a job already refused).

    Returns:
        {check name: `Check`}, in the order run. A check that needs the checkpoint is skipped
        when the model check failed.

    Raises:
        ConfigError: `input` or `output` is missing (nothing can be checked without them).
    """
    config.require_io()
    checks: dict[str, Check] = {}

    def run(name: str, fn: Callable[[], Any], needs: tuple[str, ...] = ()) -> Any:
        if not keep_going and any(c.error for c in checks.values()):
            return None
        failed = [n for n in needs if n in checks and (checks[n].error or checks[n].skipped)]
        if failed:
            checks[name] = Check(name, skipped=f"not checked ({failed[0]} could not be)")
            return None
        begun = time.monotonic()
        try:
            value = fn()
        except BAD_JOB as e:
            checks[name] = Check(name, error=e, seconds=time.monotonic() - begun)
            return None
        checks[name] = Check(name, value, seconds=time.monotonic() - begun)
        return value

    checked = run("model", lambda: models.check(config.model, allow_pickle=config.allow_pickle,
                                                 model_arch=config.model_arch))
    if checked is not None:
        log.info("checkpoint %s checked in %.2fs", checked.summary(), checks["model"].seconds)
    templated = [i for i in config.input if "{date}" in i]
    if _dated(config) and not templated:  # a dated job is one with dated inputs (`schedule.for_date`)
        checks["dates"] = Check("dates", error=ConfigError(
            f"{_dated(config)} hold {{date}}, but no input does: a dated job needs '{{date}}' in an input template "
            "as well, or none of them for a plain run"))
    inputs = None
    if templated:
        checks["inputs"] = Check("inputs", skipped=f"{templated} hold {{date}}: listed per date by jobs/nightly.py "
                                                   "and jobs/backfill.py, not here")
    else:
        inputs = run("inputs", lambda: listed(listing_spec(config)))
        if inputs is not None:
            log.info("listed %d inputs in %.2fs", inputs.count, checks["inputs"].seconds)
    run("task", lambda: _task(config, checked), needs=("model",))
    thresholds = run("thresholds", lambda: postprocess.run_thresholds(
        config.threshold, config.thresholds, checked.labels, checked.multi_label), needs=("model",))
    if config.resume and inputs is not None:
        # The staged run's inputs and settings (all but the weights' hash, known once the model
        # is resolved): refused now, not after Ray started.
        run("staged run", lambda: _check_staged(config, inputs, thresholds), needs=("thresholds",))
    run("label source", lambda: evaluation.spec_for(config.label_source, config.label_column, checked.labels,
                                                    checked.multi_label), needs=("model",))
    # a named baseline without a committed run is a bad job, not "no drift"
    run("baseline", lambda: drift.check_baseline(config.baseline))
    return checks


def _check_staged(config: ScoreConfig, inputs: Listing, thresholds: Thresholds | None) -> str:
    # lazy: resume imports the write stage and ray, which `validate` does without
    from batchscore.outputs import resume

    expected = resume.fingerprint(config.to_job(), "", thresholds.sha256 if thresholds else None)
    resume.check_staged(config.output, inputs, expected)
    return "a staged run there (if any) has these inputs and settings"


def prepare(config: ScoreConfig) -> JobPlan:
    """The `JobPlan` of `config`: `preflight`, raising its first failure.

    Raises:
        ConfigError, ListingError, ModelError, ResumeError: a bad job; nothing was started.
    """
    checks = preflight(config)
    for check in checks.values():
        if check.error is not None:
            raise check.error
    if _dated(config):
        raise ConfigError(f"{_dated(config)} hold {{date}}: a dated job scores one date at a time with batchscore "
                          "nightly/backfill (jobs/nightly.py, jobs/backfill.py, `batchscore.nightly`), which fill it in")
    task, top_k, note = checks["task"].value
    if note:
        log.warning("%s", note)
    return JobPlan(
        settings=config.to_job(), checkpoint=checks["model"].value, inputs=checks["inputs"].value, task=task,
        top_k=top_k, thresholds=checks["thresholds"].value, evaluation=checks["label source"].value,
        baseline_run=checks["baseline"].value, drift=drift_thresholds(config),
        check_seconds=checks["model"].seconds, listing_seconds=checks["inputs"].seconds)


def _dated(config: ScoreConfig) -> str:
    """The settings holding `{date}`, said as "input [...], output '...'" ("" when none)."""
    return ", ".join(f"{name} {value!r}" for name, value in (
        ("input", list(config.input)), ("output", config.output), ("baseline", config.baseline))
        if "{date}" in str(value))


def _task(config: ScoreConfig, checked: CheckpointFiles) -> tuple[str, int, str | None]:
    """(the task, labels per row, a warning when top_k asks for more classes than there are)."""
    task = models.task_for(config.task, checked)  # classification of a headless checkpoint is a bad job
    top_k, note = models.top_k_used(config.top_k, checked.labels)
    return task, top_k, note


def listing_spec(config: ScoreConfig) -> ListingSpec:
    """What the listing needs of `config`."""
    return ListingSpec(input=config.input, input_format=config.input_format, endings=config.image_endings(),
                       image_column=config.image_column, id_column=config.id_column, uri_column=config.uri_column,
                       passthrough=config.passthrough)


def actor_spec(config: ScoreConfig) -> ActorSpec:
    """What sizing the inference actors needs of `config` (`runtime.actor_resources`)."""
    # lazy: imports ray, which `validate` does without
    from batchscore.driver.runtime import ActorSpec

    return ActorSpec(actors=config.actors, gpus_per_actor=config.gpus_per_actor, cpus_per_actor=config.cpus_per_actor,
                     device=config.device, decode_cpus=config.decode_cpus)


def drift_thresholds(config: ScoreConfig) -> drift.Thresholds:
    return drift.Thresholds(config.drift_psi, config.drift_js, config.drift_error_rate, config.drift_confidence)


# -- the run's physical plan, once Ray is up ---------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """Everything the dataset is built from: each stage's spec and the sizes between them.

    Attributes:
        job: The `JobPlan` it was made from.
        model: The resolved checkpoint (weights hashed; what the actors load).
        actors: (min, max) inference actors.
        resources: CPUs and GPUs of each inference actor.
        read: The read tasks' options.
        decode: The decode tasks' spec (fused with read in one task).
        predict: The inference actors' spec.
        batch: Rows per actor call: the largest forward batch the actor may choose.
        rows_per_file: Most rows per output part file.
        files_per_block: Files per read/decode task after the first blocks.
        queue_mb: MiB of object store per actor (`feed.queue_mb`).
    """

    job: JobPlan
    model: ModelInfo
    actors: tuple[int, int]
    resources: ActorResources
    read: ReadOptions
    decode: DecodeSpec
    predict: PredictSpec
    batch: int
    rows_per_file: int
    files_per_block: int
    queue_mb: int

    @property
    def one_part(self) -> bool:
        """The listing knows the run is one part file (containers of unknown size: False)."""
        known = self.job.inputs.known_rows
        return known is not None and known <= self.rows_per_file

    def task_bounds(self) -> list[int]:
        """Listing indexes where read tasks start and end (`read.task_bounds`)."""
        # lazy: imports ray, which `validate` does without
        from batchscore.inputs import read

        inputs = self.job.inputs
        return read.task_bounds(inputs.count, inputs.kind != "file", max(self.batch, 8), self.files_per_block)

    def fingerprint(self) -> dict:
        return self.job.fingerprint(self.model.weights_sha256)

    def to_dict(self) -> dict:
        """The plan as the manifest records it (JSON-ready; the labels file's mapping left out)."""
        def plain(value):
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                        if f.name not in ("mapping", "labels")}
            if isinstance(value, (tuple, list, frozenset, set)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            return value

        return {
            "task": self.predict.task.task, "top_k": self.job.top_k, "actors": list(self.actors),
            "resources": plain(self.resources), "read": plain(self.read), "decode": plain(self.decode),
            "predict": plain(self.predict), "evaluation": plain(self.job.evaluation), "batch": self.batch,
            "rows_per_file": self.rows_per_file, "files_per_block": self.files_per_block, "queue_mb": self.queue_mb,
        }


def physical(config: ScoreConfig, job: JobPlan, model: ModelInfo, cluster: dict[str, float],
             resources: ActorResources) -> RunPlan:
    """The `RunPlan` of `job` once Ray is up: `model` resolved, `resources` sized
    (`runtime.actor_resources`) on a cluster of `cluster` resources (`ray.cluster_resources()`).

    Raises:
        ConfigError: decode_device cuda for actors without a GPU.
        ModelError: an embedding the checkpoint cannot give (a pooler it lacks).
    """
    # lazy: imports ray, which `validate` does without
    from batchscore.inputs.read import ReadOptions

    gpus = resources.gpus
    memory = feed.accelerator_memory_gib(cluster) if gpus > 0 and config.batch_size is None else None
    batch = max(batch_candidates(config.batch_size, on_gpu=gpus > 0, gpu_memory_gib=memory))
    decode_device = device_decode.resolve(config.decode_device, gpus)
    task = models.task_spec(model, config.task, config.embed_pool, config.embed_normalize, config.embed_dtype)
    queue_mb = feed.queue_mb(config.decoded_queue_mb, batch, model.preprocess.output_hw)
    if queue_mb > config.decoded_queue_mb:
        log.info("decoded_queue_mb raised from %d to %d: three batches of %d images per actor",
                 config.decoded_queue_mb, queue_mb, batch)
    return RunPlan(
        job=job, model=model, actors=config.actors, resources=resources,
        read=ReadOptions(image_column=config.image_column, id_column=config.id_column, passthrough=config.passthrough,
                         retries=config.read_retries, batch_size=config.decode_batch_size),
        decode=DecodeSpec(model.preprocess, max_image_pixels=config.max_image_pixels, formats=config.formats,
                          nice=config.decode_nice, device=decode_device, cpus=config.decode_cpus),
        predict=PredictSpec(
            device=config.device, dtype=config.dtype, top_k=job.top_k, batch_size=config.batch_size,
            thresholds=job.thresholds, task=task,
            # JPEGs decoded in the actor, copies overlapped, torch.compile (batchscore.inference.feed)
            feeding=feed.FeedOptions(decode_on_device=decode_device != "cpu", max_image_pixels=config.max_image_pixels,
                                     formats=config.formats, compile=config.compile, decode_cpus=config.decode_cpus,
                                     decode_device=decode_device)),
        batch=batch,
        rows_per_file=config.rows_per_file or (GPU_ROWS_PER_FILE if gpus > 0 else CPU_ROWS_PER_FILE),
        files_per_block=files_per_block(job.inputs.count, max(batch, 8), config.actors[1]),
        queue_mb=queue_mb,
    )


def files_per_block(files: int, batch: int, actors: int) -> int:
    """Files per read/decode task after the first blocks: FILES_PER_BLOCK, but at most a
    quarter of each actor's share, so a small run still spreads over every actor (one block
    of 208 files went to one of two actors), and never below one model batch."""
    return max(batch, min(FILES_PER_BLOCK, files // (4 * actors)))
