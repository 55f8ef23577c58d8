"""The one configuration object shared by the CLI, YAML job files, `ray job submit` and Python.

`ScoreConfig` is frozen and typed. It is built from a YAML file (`from_yaml`), a dict
(`from_dict`) or keyword arguments, and changed only by `with_overrides`, which returns a new
object. Unknown keys are errors that name the key, the closest valid one ("did you mean") and
all valid ones. Precedence, as in timm: explicit flag > YAML file > default here. Local relative
paths in a YAML file's `input`, `output` and `model` are relative to that file's folder;
flags and keyword arguments stay relative to the working directory. Its JSON Schema is `schemas/job.schema.json`
(a test keeps the two in step), and `to_dict()` is what every run writes into its manifest.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from batchscore.exceptions import ConfigError
from batchscore.inputs import formats as _formats

DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DECODE_DEVICES = ("auto", "cpu", "cuda", "torchvision")
INPUT_FORMATS = ("auto", "files", "tar", "parquet", "manifest", "azureml")
RESERVED_COLUMNS = ("id", "source", "labels", "probs", "embedding", "error", "error_code", "model", "run_id")
TASKS = ("auto", "classify", "embed", "classify+embed")
EMBED_POOLS = ("auto", "cls", "pooler", "mean")
EMBED_DTYPES = ("float32", "float16")
# The input formats that have something to pass through: columns, or a tar sample's members.
PASSTHROUGH_FORMATS = ("manifest", "parquet", "tar")
# The settings that name a place; in a YAML job file a local relative one is relative to the file.
PATH_KEYS = ("input", "output", "model", "thresholds", "label_source", "baseline")
# Where ground truth comes from (besides a labels file): each image's parent folder, or a column.
LABEL_SOURCES = ("folder", "column")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Everything one scoring run needs.

    Attributes:
        input: Where the inputs are: directories (listed recursively), globs, or single
            files, as local paths or URIs (gs://, s3://, file://, http(s):// for files).
        output: The run's output directory (local path or URI).
        input_format: auto (from the file endings), files (images), tar (WebDataset shards),
            parquet (an image-bytes column), manifest (CSV, JSONL or Parquet listing image
            URIs), azureml (Azure ML image-classification request JSON).
        image_column: parquet: the column holding image bytes (binary, or a struct with a
            `bytes` field as Hugging Face datasets write it).
        id_column: parquet: the column holding each row's id; None = `<file>#<row>`.
        uri_column: manifest: the column holding each image's URI.
        passthrough: Input columns carried into the output as strings: manifest or parquet
            columns, or a tar sample's member of that extension (e.g. `cls`). Refused for
            plain image files and Azure ML request files, which have none.
        read_retries: Attempts per read before a transient failure becomes an error row.
        max_error_fraction: Fail the run, committing nothing, when more than this share of
            rows are errors (stopping early once that is certain); 1.0 never fails.
        model: A local checkpoint directory or a gs://, s3:// URI of one (cached per node);
            None uses the demo checkpoint shipped inside the package.
        allow_pickle: Accept a checkpoint whose weights are only pickle files
            (pytorch_model.bin); they are then loaded with torch.load(weights_only=True).
        top_k: How many labels per image, most probable first; 0 keeps all classes.
        task: What each row holds: classify (top-k labels and probabilities), embed (an
            `embedding` vector), or classify+embed (both, from one forward pass); auto =
            classify for a checkpoint with a classification head, embed for a headless one.
        embed_pool: The embedding: pooler (the checkpoint's trained pooler output), cls (the
            final [CLS] token, after the last norm), mean (the mean of the final patch
            tokens); auto = pooler where the checkpoint has trained pooler weights, else cls.
        embed_normalize: L2-normalise each embedding (then a dot product is the cosine).
        embed_dtype: Element type of the embedding column: float32, or float16 (half the bytes).
        model_arch: vision_transformer .npz only: the timm architecture to build (e.g.
            vit_base_patch16_224); None = read from the file's shapes.
        batch_size: Images per forward pass; None = measured: each inference actor runs
            its first batches in chunks of 8, 16 and 32 images (16 to 1,024 on a GPU, by
            its memory), times them and keeps the fastest per image.
        dtype: Model dtype; auto = fp16 on CUDA, bf16 on a CPU with native bf16, else fp32.
        device: auto = CUDA when the actor was given a GPU, else CPU.
        actors: (min, max) size of the inference actor pool.
        gpus_per_actor: GPUs per inference actor (fractional allowed); None = 1 when the
            cluster has GPUs, else 0.
        cpus_per_actor: CPUs per inference actor, which also sets its torch threads; None =
            1 with a GPU, else the CPUs of the cluster's largest node left after one decode
            and one write task, split over the largest pool (1 while no node has CPUs). On a
            local Ray, sizes that fit no node or leave decode no CPU are refused.
        decode_cpus: CPUs per read/decode task. Must differ from the actor's CPUs so Ray
            does not fuse decode into the model actor.
        decode_batch_size: Images per read/decode task call.
        decoded_queue_mb: MiB of Ray's object store the run may use for each inference
            actor (the run's bound is this times the largest pool): decoded images waiting
            for the model, and results. Decode runs ahead of the model only this far, so
            memory stays flat however many images a run has. 256 MiB holds ~1,700 images
            at 224x224; a fast GPU actor may want more.
        decode_nice: Niceness (0-19) of the threads that decode, on Linux: where decode
            shares cores with the model, the model's threads are served first and decode
            fills the gaps. 0 = normal priority.
        decode_device: Where JPEGs are decoded: cpu (Pillow, in the CPU decode tasks), cuda
            (in batches by nvJPEG on the inference actor's GPU, resized and cropped there;
            the CPU tasks then only check headers and decode the other formats; whatever
            nvJPEG refuses is decoded on the CPU), torchvision (the same in-actor path on
            whatever device the actor has: libjpeg-turbo through torchvision on a CPU, for
            tests and comparisons); auto = cuda when the inference actors have GPUs, else cpu.
        compile: Run the model through `torch.compile` (each forward batch size compiles
            on its first batch, its time logged; fix `batch_size` to compile once).
        max_image_pixels: Decompression-bomb guard: images declaring more pixels are refused
            before any pixel is decoded. The default is the limit where Pillow itself
            refuses (twice its `MAX_IMAGE_PIXELS` warning threshold): 178,956,970 pixels,
            which takes a 100-megapixel camera frame.
        formats: The image formats decoded (Pillow names, see `batchscore.inputs.formats.FORMATS`;
            any case, and JPG, HEIC, TIF accepted);
            anything else is a `decode.unsupported_format` row. The default takes JPEG,
            MPO, PNG, WebP, GIF, BMP, TIFF, AVIF and HEIF; PPM, TGA, ICO and JPEG2000 are
            known but must be asked for.
        extensions: File endings (with the dot, any case) of the files listed as images from
            folders, globs and named files; None = the endings of `formats`. A file without
            an ending can be scored through a manifest.
        rows_per_file: Most rows per output Parquet part file (one row group each), written
            by a worker once that many rows are scored (Ray Data bundles scored blocks up to
            it, so some parts are smaller); None = 20,000 with GPUs, 2,000 on
            CPUs. A run that dies keeps its complete parts for `resume`, so this also bounds
            the work a crash loses (per write in flight).
        overwrite: Replace a committed run in `output` instead of treating the run as done.
        resume: Continue the newest uncommitted run in `output`: keep its complete part
            files, score only the inputs they lack, then commit all. Without a run to
            continue, a new run starts, so it is safe to always set.
        progress_seconds: Seconds between progress lines in the log.
        threshold: Multi-label checkpoints (`problem_type: multi_label_classification`) and
            single-logit heads: a row holds the labels whose sigmoid score is at or above
            their threshold, most probable first, at most `top_k` (0 = no cap); possibly
            none. This is the threshold of every label the `thresholds` file does not name.
        thresholds: A JSON or YAML file mapping label to threshold (0 to 1), for the labels
            that need their own; a label the checkpoint does not have is an error.
        label_source: Ground truth, to evaluate the run against (manifest `evaluation`,
            `inspect`, the report): `folder` (the ImageFolder layout: each image's parent
            folder is its class), `column` (the `label_column` of a manifest or Parquet
            input, or a tar sample's member of that extension, e.g. `cls`), or a CSV, JSONL
            or JSON file of `file` (or `id`) and `label_column` (default `label`) columns.
            A multi-label row's labels are separated by commas (or a JSON list).
        label_column: The ground-truth column (label_source `column`, implied when only this
            is set; it is carried into the output like a passthrough column) or the label
            column of a labels file.
        baseline: The committed output to compare this run with in its report (label
            distribution, error rate, mean top-1 confidence); jobs/nightly.py and backfill
            set it to the previous committed date partition.
        drift_psi: Flag drift when the population stability index of the top-1 label
            distribution against the baseline exceeds this (0.1 some, 0.25 a large shift).
        drift_js: Flag drift when the Jensen-Shannon divergence (base 2, from 0 to 1) of the
            top-1 label distributions exceeds this.
        drift_error_rate: Flag drift when the share of error rows changes by more than this.
        drift_confidence: Flag drift when the mean top-1 probability changes by more than this.
    """

    input: tuple[str, ...] = ()
    output: str = ""
    input_format: Literal["auto", "files", "tar", "parquet", "manifest", "azureml"] = "auto"
    image_column: str = "image"
    id_column: str | None = None
    uri_column: str = "uri"
    passthrough: tuple[str, ...] = ()
    read_retries: int = 3
    max_error_fraction: float = 0.1
    model: str | None = None
    allow_pickle: bool = False
    top_k: int = 5
    task: Literal["auto", "classify", "embed", "classify+embed"] = "auto"
    embed_pool: Literal["auto", "cls", "pooler", "mean"] = "auto"
    embed_normalize: bool = False
    embed_dtype: Literal["float32", "float16"] = "float32"
    model_arch: str | None = None
    batch_size: int | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    actors: tuple[int, int] = (1, 1)
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float = 0.5
    decode_batch_size: int = 32
    decode_nice: int = 10
    decode_device: Literal["auto", "cpu", "cuda", "torchvision"] = "auto"
    compile: bool = False
    decoded_queue_mb: int = 256
    max_image_pixels: int = 178_956_970
    formats: tuple[str, ...] = _formats.DEFAULT_FORMATS
    extensions: tuple[str, ...] | None = None
    rows_per_file: int | None = None
    overwrite: bool = False
    resume: bool = False
    progress_seconds: float = 10.0
    threshold: float = 0.5
    thresholds: str | None = None
    label_source: str | None = None
    label_column: str | None = None
    baseline: str | None = None
    drift_psi: float = 0.2
    drift_js: float = 0.1
    drift_error_rate: float = 0.02
    drift_confidence: float = 0.05

    def __post_init__(self) -> None:
        _coerce_fields(self)
        if self.label_column and self.label_source is None:
            object.__setattr__(self, "label_source", "column")
        if self.label_source == "column" and self.label_column and self.label_column not in self.passthrough:
            # The ground truth is carried to the write stage (and the output) as a passthrough column.
            object.__setattr__(self, "passthrough", (*self.passthrough, self.label_column))
        self._validate()

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> ScoreConfig:
        """Builds a config from a mapping, rejecting unknown keys."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise ConfigError(f"{where}: {unknown_keys(unknown, 'key')}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ScoreConfig:
        """Reads a YAML job file; `overrides` (e.g. CLI flags) win over the file.

        Local relative paths in the file's `input`, `output` and `model` are taken relative to
        the file's folder (and written out absolute), so a job file means the same data from
        any working directory; URIs, absolute paths and `~` paths are kept as written.
        `overrides` are not touched: a flag stays relative to the working directory.
        """
        import yaml  # lazy: PyYAML only for a job file

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (looked for {path.absolute()})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if isinstance(data, dict):
            data = _relative_to(data, path.absolute().parent)
        return cls.from_dict(data, where=str(path)).with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> ScoreConfig:
        """Returns a copy with the given non-None settings replaced."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ConfigError(unknown_keys(unknown, "setting"))
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists), as written into the run manifest."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_job(self) -> dict[str, Any]:
        """`to_dict` with local relative paths made absolute (from the working directory): a
        job file's contents that mean the same wherever the file is put (a job file's own
        relative paths are relative to its folder)."""
        return _relative_to(self.to_dict(), Path.cwd())

    # -- validation --------------------------------------------------------------------

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.input_format in INPUT_FORMATS,
             f"input_format: expected one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        clash = sorted(set(self.passthrough) & set(RESERVED_COLUMNS))
        need(not clash, f"passthrough: {clash} would overwrite output columns {list(RESERVED_COLUMNS)}")
        need(len(set(self.passthrough)) == len(self.passthrough), f"passthrough: duplicate names in {list(self.passthrough)}")
        if self.input_format not in ("auto", *PASSTHROUGH_FORMATS):
            need(not self.passthrough, passthrough_refused(self.passthrough, f"input_format is {self.input_format}"))
        need(0.0 <= self.max_error_fraction <= 1.0,
             f"max_error_fraction: expected a number from 0 to 1, got {self.max_error_fraction}")
        need(self.read_retries >= 1, f"read_retries: expected a number >= 1, got {self.read_retries}")
        need(self.dtype in DTYPES, f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.device in DEVICES, f"device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.top_k >= 0, f"top_k: expected 0 (all classes) or a positive number, got {self.top_k}")
        need(self.task in TASKS, f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        need(self.embed_pool in EMBED_POOLS, f"embed_pool: expected one of {', '.join(EMBED_POOLS)}, got {self.embed_pool!r}")
        need(self.embed_dtype in EMBED_DTYPES,
             f"embed_dtype: expected one of {', '.join(EMBED_DTYPES)}, got {self.embed_dtype!r}")
        need(self.batch_size is None or self.batch_size >= 1, f"batch_size: expected a positive number, got {self.batch_size}")
        need(self.decode_batch_size >= 1, f"decode_batch_size: expected a positive number, got {self.decode_batch_size}")
        lo, hi = self.actors
        need(1 <= lo <= hi, f"actors: expected MIN[,MAX] with 1 <= MIN <= MAX, got {lo},{hi}")
        need(self.gpus_per_actor is None or self.gpus_per_actor >= 0,
             f"gpus_per_actor: expected a number >= 0, got {self.gpus_per_actor}")
        need(self.cpus_per_actor is None or self.cpus_per_actor > 0,
             f"cpus_per_actor: expected a number > 0, got {self.cpus_per_actor}")
        need(self.decode_cpus > 0, f"decode_cpus: expected a number > 0, got {self.decode_cpus}")
        need(self.decoded_queue_mb >= 16, f"decoded_queue_mb: expected at least 16 (MiB), got {self.decoded_queue_mb}")
        need(0 <= self.decode_nice <= 19, f"decode_nice: expected a niceness from 0 to 19, got {self.decode_nice}")
        need(self.decode_device in DECODE_DEVICES,
             f"decode_device: expected one of {', '.join(DECODE_DEVICES)}, got {self.decode_device!r}")
        need(not (self.decode_device == "cuda" and self.device == "cpu"),
             "decode_device=cuda needs the model on a GPU, but device is cpu; use decode_device cpu or torchvision")
        need(not (self.decode_device == "cuda" and self.gpus_per_actor == 0),
             "decode_device=cuda needs inference actors with a GPU, but gpus_per_actor is 0; use decode_device cpu "
             "or torchvision")
        need(self.max_image_pixels >= 1, f"max_image_pixels: expected a positive number, got {self.max_image_pixels}")
        need(self.rows_per_file is None or self.rows_per_file >= 1,
             f"rows_per_file: expected a positive number, got {self.rows_per_file}")
        need(self.progress_seconds > 0, f"progress_seconds: expected a number > 0, got {self.progress_seconds}")
        unknown = [f for f in self.formats if f not in _formats.FORMATS]
        need(not unknown, f"formats: unknown format(s) {unknown}; expected names from {list(_formats.FORMATS)}")
        need(bool(self.formats), "formats: expected at least one image format, got none")
        need(self.extensions is None or all(e.startswith(".") for e in self.extensions),
             f"extensions: expected endings that start with '.', got {list(self.extensions or ())}")
        need(0.0 <= self.threshold <= 1.0, f"threshold: expected a number from 0 to 1, got {self.threshold}")
        need(self.label_source != "column" or bool(self.label_column),
             "label_source: 'column' needs label_column (the manifest or Parquet column, or tar member, "
             "holding each image's label)")
        need(self.label_source != "column" or self.input_format in ("auto", *PASSTHROUGH_FORMATS),
             f"label_column: ground truth from a column needs manifest, Parquet or tar inputs, but input_format "
             f"is {self.input_format}; use label_source folder or a labels file")
        for name in ("drift_psi", "drift_js", "drift_error_rate", "drift_confidence"):
            need(getattr(self, name) >= 0, f"{name}: expected a number >= 0, got {getattr(self, name)}")

    def image_endings(self) -> frozenset[str]:
        """File endings (lower case) that make a listed file an image: `extensions`, or those of `formats`."""
        if self.extensions is not None:
            return frozenset(e.lower() for e in self.extensions)
        return _formats.endings(self.formats)

    def require_io(self) -> None:
        """Raises unless `input` and `output` are set (they may come from flags, not YAML)."""
        if not self.input:
            raise ConfigError("input: expected at least one directory, glob or file; got none")
        if not self.output:
            raise ConfigError("output: expected an output directory or URI; got none")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ScoreConfig)]


def default(name: str) -> Any:
    """The default of setting `name`: each default is written once, in `ScoreConfig`, and the
    stages' specs take theirs from here."""
    return ScoreConfig.__dataclass_fields__[name].default


def unknown_keys(unknown: list[str], noun: str) -> str:
    """The message for unknown keys: each one with its closest valid key (difflib), then all
    valid keys: `unknown key(s) 'topk' (did you mean 'top_k'?); valid keys are: ...`."""
    said = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), field_names(), n=1, cutoff=0.6)
        said.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return f"unknown {noun}(s) {', '.join(said)}; valid {noun}s are: {', '.join(field_names())}"


def passthrough_refused(passthrough: tuple[str, ...], why: str) -> str:
    """Why `passthrough` cannot be honoured: the one message for config and listing."""
    return (f"passthrough {list(passthrough)} refused: passthrough applies to manifest and Parquet columns and tar "
            f"members, but {why}; drop --passthrough or use a manifest listing the images with those columns")


def _relative_to(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`data` with each local relative path in `PATH_KEYS` joined to `folder` (absolute)."""
    def place(value: Any) -> Any:
        if not isinstance(value, str) or not value or "://" in value or value.startswith("~") or os.path.isabs(value):
            return value
        if value in LABEL_SOURCES:  # label_source: a keyword, not a file
            return value
        return os.path.normpath(os.path.join(folder, value))

    out = dict(data)
    for key in PATH_KEYS:
        if key in out:
            value = out[key]
            out[key] = [place(v) for v in value] if isinstance(value, list) else place(value)
    return out


def _coerce_fields(cfg: ScoreConfig) -> None:
    """Checks each field against its annotation, converting lists to tuples and ints to floats.

    YAML and argparse give lists and strings; the frozen object holds tuples. Anything else
    that does not match the annotation is a `ConfigError` naming the field.
    """
    hints = typing.get_type_hints(ScoreConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        new = _coerce(f.name, value, hints[f.name])
        if new is not value:
            object.__setattr__(cfg, f.name, new)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is Literal:
        return value  # checked by _validate against the named choices
    if origin is tuple:
        if name == "actors" and isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if isinstance(value, str) and name in ("input", "extensions", "passthrough", "formats"):
            value = tuple(v for v in value.split(",") if v) if name == "formats" else (value,)
        if name == "formats" and isinstance(value, (list, tuple)):
            value = tuple(_formats.canonical(v) if isinstance(v, str) else v for v in value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise ConfigError(f"{name}: expected two values, got {len(value)}: {list(value)}")
        item_type = args[0]
        return tuple(_coerce(name, v, item_type) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled annotation {hint} for {name}")
