"""The `batchscore` command: `score`, `validate`, `demo` and `inspect`.

Flags are generated from `ScoreConfig`'s fields, so every setting a YAML job file can hold is
also a flag (`top_k` ↔ `--top-k`), and a flag given on the command line wins over the file.
A list flag may be repeated (`--input a.png --input b.png`) or take several values; either
way the values add up. Local relative paths in flags are relative to the working directory
(in a job file, to the job file's folder).

`validate` runs every check a `score` makes before it starts Ray (config, listing, the
checkpoint's files, the thresholds and labels files against its labels, the baseline) in
about a second, and exits 2 when one fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
import types
import typing
from typing import Any

from batchscore import demo, plan
from batchscore.config import ScoreConfig, field_names
from batchscore.driver.progress import LOG_FORMAT, cli_terms

# The command's exit codes, defined beside the exceptions that end in them (`exit_code`).
from batchscore.exceptions import (  # noqa: F401
    EXIT_BAD_JOB,
    EXIT_BUDGET,
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_COMMITTED,
    EXIT_OK,
    BatchscoreError,
)
from batchscore.outputs import output
from batchscore.outputs.lease import Lease
from batchscore.reporting import report

EXIT_HELP = """exit status:
  0  committed, or already committed (validate: every check passed; inspect: reported)
  2  bad job: config, inputs or checkpoint; fix the job, do not retry as is
  3  error budget exceeded (more error rows than max_error_fraction); nothing committed
  4  the run failed (infrastructure, output, rows not matching inputs); nothing committed
  5  another run holds the output's lease; nothing written, retry later
  6  inspect, report: the output (or the --baseline named) holds no committed run
  15 stopped by SIGTERM; nothing committed, staged parts kept for --resume
  130 interrupted (Ctrl-C); nothing committed, staged parts kept for --resume

Local relative paths in flags are relative to the working directory; in a --config job file,
to the job file's folder."""

log = logging.getLogger("batchscore")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if _separate_results and args.command in ("score", "demo"):
            _keep_stdout_for_results()  # the commands that start Ray, whose processes print to stdout

        def command():
            if args.command == "inspect":
                found = report.inspect_output(args.output, baseline=args.baseline)
                _out(json.dumps(found, indent=2) if args.json else report.format_report(found))
                return None
            if args.command == "report":  # the HTML report
                _out(report.write_report(args.output, args.baseline, path=args.out))
                return None
            config = config_from_args(args)
            if args.command == "validate":
                return validate(config)
            if args.command == "demo":
                _out(demo.run(config).summary())
                return None
            from batchscore import pipeline  # lazy: Ray Data's stages, for score only

            return pipeline.score(config)

        return _guarded(command, args)
    finally:
        _flush_stdout()  # now, while a reader that went away (`| head`) can still be let go quietly


def validate(config: ScoreConfig) -> None:
    """`batchscore validate`: the checks `score` makes before it starts Ray (`plan.preflight`,
    the same code), without Ray or transformers: the checkpoint's files (name, labels,
    weights), the inputs listed (count by format), the staged run with --resume, the task and
    top_k against its classes, the thresholds file and the label source against its labels,
    that a `baseline` holds a committed run; then whether the output is already committed or
    busy. Every check runs even when another failed (those that need the checkpoint only once
    it was read). What was checked goes to stderr as `validate: ` lines; on success the
    resolved config goes to stdout as JSON (the contents of a valid job file). Raises the
    first failure, as `score` would have."""
    started = time.monotonic()
    checks = plan.preflight(config, keep_going=True)
    said = []
    asked = {"thresholds": bool(config.thresholds or config.threshold != 0.5), "label source": bool(config.label_source),
             "baseline": bool(config.baseline)}
    for check in checks.values():
        if not asked.get(check.name, True):
            continue  # a default with nothing to say
        if check.error is not None:
            said.append(f"{check.name}: FAILED: {check.error}")
        elif check.skipped:
            said.append(f"{check.name}: {check.skipped}")
        else:
            said.append(f"{check.name}: {_checked(check, config)}")
    said.append(f"output: {_committed(config)}")
    failed = [c.error for c in checks.values() if c.error is not None]
    seconds = time.monotonic() - started
    said.append(f"{len(failed)} check(s) FAILED in {seconds:.2f}s" if failed else
                f"ok: every check before Ray passed in {seconds:.2f}s")
    for line in said:
        print(f"validate: {line}", file=sys.stderr)
    if failed:
        raise failed[0]
    _out(json.dumps(config.to_job(), indent=2))  # a valid job file, wherever it is saved


def _checked(check: plan.Check, config: ScoreConfig) -> str:
    """What a passed preflight check found, in one line."""
    value = check.value
    if check.name == "model":
        return value.summary()
    if check.name == "inputs":
        unit = {"files": "image file(s)", "manifest": "image URI(s) from manifest(s)", "tar": "tar shard(s)",
                "parquet": "Parquet file(s)", "azureml": "Azure ML request file(s)"}.get(value.format, "input(s)")
        rows = value.known_rows if value.format == "parquet" else None
        return f"{value.count} {unit}, format {value.format}" + (f", {rows} rows" if rows is not None else "")
    if check.name == "staged run":
        return value
    if check.name == "task":
        task, top_k, note = value
        if task == "embed":
            return "embed"
        return f"{task}, top_k {top_k} label(s) per row" + (f" (warning: {note})" if note else "")
    if check.name == "thresholds":
        if value is None:
            return (f"none (single-label checkpoint: softmax, top_k labels per row; threshold {config.threshold} "
                    "unused)")
        return f"default {value.default}" + (f", {len(value.per_label)} per-label from {value.file}"
                                             if value.per_label or value.file else "")
    if check.name == "label source":
        kind = "multi-label" if value.multi_label else "single-label"
        if value.source == "file":
            return f"{value.labels_file}: {len(value.mapping)} labelled id(s), {kind} evaluation"
        return f"{value.source}" + (f" (column {value.column})" if value.column else "") + f", {kind} evaluation"
    if check.name == "baseline":
        return (f"{config.baseline} holds {{date}}: checked per date" if value is None
                else f"{config.baseline} holds committed run {value}")
    return str(value)


def _committed(config: ScoreConfig) -> str:
    """Whether the output already holds a committed run, or another run holds its lease now."""
    if "{date}" in config.output:
        return f"{config.output} holds {{date}}: one output per date"
    manifest = output.read_manifest(config.output)
    said = (f"{config.output} holds committed run {manifest['run_id']}; score is a no-op there unless --overwrite"
            if manifest else f"{config.output} (no committed run)")
    busy = Lease(config.output, "validate").busy()  # transient: said, not a failed check
    return said + (f"; busy now, score would exit {EXIT_BUSY}: {busy}" if busy else "")


def run_command(argv: list[str], action) -> int:
    """Runs `action(config)` for a `score`-style command line, with the CLI's logging, messages
    and exit codes; prints the `RunResult` it returns (if any). For jobs/*.py entry points."""
    args = build_parser().parse_args(argv)
    return _guarded(lambda: action(config_from_args(args)), args)


def _guarded(command, args: argparse.Namespace) -> int:
    """Runs `command()`; every failure ends as a logged message and an exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    with cli_terms():  # messages and summaries say `--overwrite`, not `overwrite=True`
        try:
            result = command()
        except KeyboardInterrupt:  # one line, not Ray Data's traceback; the lease was released on the way out
            log.error("interrupted: nothing committed; the parts staged so far stay for --resume")
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - every failure ends as a message and an exit code
            code = _exit_code(e)
            # Ray's exceptions carry its terminal colours; a log gets none (docs/operations.md)
            text = str(e) if sys.stderr.isatty() else re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            log.error("%s: %s", type(e).__name__, text, exc_info=code == EXIT_FAILED)
            return code
        if result is not None:
            _out(json.dumps(dataclasses.asdict(result), indent=2) if getattr(args, "json", False)
                 else result.summary())
    return EXIT_OK


# Where results go (the summary, --json, validate's job file): None is sys.stdout. The
# `batchscore` command (`entry`) keeps the process's real stdout for them alone while a run's
# Ray prints its own lines (workers' stdout, the raylet's errors) to stdout: those then go to
# stderr, so `batchscore score --json | jq .` reads only the result.
_separate_results = False
_results = None


def _keep_stdout_for_results() -> None:
    """Results to the real stdout (a duplicate of its descriptor); descriptor 1, and with it
    whatever Ray or a library writes to stdout, to stderr."""
    global _results
    if _results is not None or sys.stdout is None:  # None: started with stdout closed (`>&-`)
        return
    sys.stdout.flush()
    _results = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding=sys.stdout.encoding, errors="replace")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def _stdout():
    """The results' stream; None when the process was started with stdout closed (`>&-`)."""
    return _results if _results is not None else sys.stdout


def _out(text: str) -> None:
    """Prints a result to stdout; a reader that went away (`batchscore ... | head -1`) ends
    the output quietly instead of with a BrokenPipeError traceback."""
    if _stdout() is None:
        return
    try:
        print(text, file=_stdout(), flush=True)
    except BrokenPipeError:
        _drop_stdout()


def _flush_stdout() -> None:
    if _stdout() is None:
        return
    try:
        _stdout().flush()
    except BrokenPipeError:
        _drop_stdout()


def _drop_stdout() -> None:
    """Points the results' stdout at /dev/null, so what is left in its buffer, and Python's
    own flush at exit, go nowhere instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, _stdout().fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (tests)
        pass


def _exit_code(e: Exception) -> int:
    """The exit code of a failure: its `exit_code` (`batchscore.exceptions`), else EXIT_FAILED."""
    return e.exit_code if isinstance(e, BatchscoreError) else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    form = {"epilog": EXIT_HELP, "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser = argparse.ArgumentParser(prog="batchscore", description="Batch image classification on Ray Data.", **form)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("score", "score images into committed Parquet output"),
                        ("validate", "check a job without Ray (config, inputs listed, the checkpoint's files) in "
                                     "about a second; print the resolved config as JSON on stdout and what was "
                                     "checked on stderr; exit 2 when a check fails"),
                        ("demo", "score the shipped demo digits with the shipped demo model (always re-scores); "
                                 "print accuracy")):
        p = sub.add_parser(name, help=help_, description=help_, **form)
        p.add_argument("--config", help="YAML job file; flags given here override it")
        if name == "score":
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        _add_config_flags(p)
    p = sub.add_parser("inspect", help="report on the committed run in an output: counts, error codes, labels",
                       description="Report on the committed run in OUTPUT (local or a bucket URI), read from its "
                                   "manifest and the Parquet files it lists. Exits 6 when OUTPUT holds no "
                                   "committed run.", **form)
    p.add_argument("output", help="the run's output directory or URI")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--baseline", metavar="OUTPUT", help="compare with the committed run in OUTPUT (drift; default: "
                   "the baseline the run was scored with, e.g. the previous nightly partition); exit 6 when OUTPUT "
                   "holds no committed run")
    p = sub.add_parser("report", help="write the run report (_report.html): counts, labels, samples, evaluation, "
                                      "drift", description="Write the self-contained HTML report of the committed "
                       "run in OUTPUT to OUTPUT/_report.html (every run writes one after its commit) and print "
                       "where it went. Exits 6 when OUTPUT holds no committed run.", **form)
    p.add_argument("output", help="the run's output directory or URI")
    p.add_argument("--baseline", metavar="OUTPUT", help="compare with the committed run in OUTPUT (drift; default: "
                   "the baseline the run was scored with, e.g. the previous nightly partition); exit 6 when OUTPUT "
                   "holds no committed run")
    p.add_argument("--out", metavar="FILE", help="write the page here instead (a local file)")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ScoreConfig)
    helps = _attribute_docs()
    for f in dataclasses.fields(ScoreConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        listed = typing.get_origin(hint) is tuple or tuple in map(typing.get_origin, typing.get_args(hint))
        # The default is said in the text: the flag's own default stays None, so an unset flag
        # never overrides a job file.
        help_ = helps.get(f.name, "") + (" Repeatable: the values add up." if listed and f.name != "actors" else "")
        help_ = f"{help_} (default: {_default_text(f.default)})".lstrip()
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_)
        elif f.name == "actors":
            parser.add_argument(flag, metavar="MIN[,MAX]", type=_actors, help=help_)
        elif listed:
            # Repeated flags add up: `--input a.png --input b.png` lists both.
            parser.add_argument(flag, nargs="+", action="extend", metavar=f.name.upper(), help=help_)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), help=help_)
        else:
            parser.add_argument(flag, type=_scalar_type(hint), metavar=f.name.upper(), help=help_)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in field_names()}
    if args.config:
        return ScoreConfig.from_yaml(args.config, **overrides)
    return ScoreConfig().with_overrides(**overrides)


def _default_text(value: Any) -> str:
    if value is None or value in ((), ""):
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(v, int) for v in value):  # actors
            return str(value[0]) if value[0] == value[1] else f"{value[0]},{value[1]}"
        return " ".join(map(str, value))
    return str(value).replace("%", "%%")


def _scalar_type(hint: Any):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return {int: int, float: float}.get(hint, str)


def _actors(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN or MIN,MAX (integers), got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected MIN or MIN,MAX, got {text!r}")
    return (parts[0], parts[-1])


def _attribute_docs() -> dict[str, str]:
    """Help texts from the `Attributes:` section of ScoreConfig's docstring."""
    doc = (ScoreConfig.__doc__ or "").split("Attributes:", 1)[-1]
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s{8}(\w+): (.*?)(?=^\s{8}\w+: |\Z)", doc, re.S | re.M):
        out[m.group(1)] = " ".join(m.group(2).split()).replace("%", "%%")
    return out


def entry() -> None:
    """The `batchscore` command: `main`, then a prompt exit. Ray is shut down and the output
    streams flushed first; then the process ends without the interpreter's teardown (~0.6 s on
    2 cores of freeing a Ray driver's objects one by one, after everything was written)."""
    global _separate_results
    _separate_results = True
    # SIGTERM: exit 15 whenever it comes, as Ray's own handler does once Ray has started (a
    # SystemExit, so the lease is released on the way out)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signal.SIGTERM))
    code = main()
    try:
        ray = sys.modules.get("ray")  # imported only by the commands that start it
        if ray is not None:
            ray.shutdown()  # also the processes of a Ray whose start was interrupted (Ctrl-C)
    finally:
        logging.shutdown()
        _flush_stdout()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    entry()
