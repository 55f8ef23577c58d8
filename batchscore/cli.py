"""The `batchscore` command: `score`, `validate`, `demo` and `inspect`.

Flags are generated from `ScoreConfig`'s fields, so every setting a YAML job file can hold is
also a flag (`top_k` ↔ `--top-k`), and a flag given on the command line wins over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import types
import typing
from typing import Any

from batchscore.config import ConfigError, ScoreConfig, field_names

EXIT_OK = 0
EXIT_BAD_JOB = 2  # bad config, inputs or checkpoint: fix the job, do not retry as is
EXIT_BUDGET = 3  # more error rows than max_error_fraction allows; nothing was committed
EXIT_FAILED = 4  # the run failed (infrastructure, output); nothing was committed
EXIT_BUSY = 5  # another run holds the output's lease; nothing was written, retry later

log = logging.getLogger("batchscore")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command():
        if args.command == "inspect":
            from batchscore import report

            found = report.inspect_output(args.output)
            print(json.dumps(found, indent=2) if args.json else report.format_report(found))
            return None
        config = config_from_args(args)
        if args.command == "validate":
            print(json.dumps(config.to_dict(), indent=2))
            return None
        if args.command == "demo":
            from batchscore import demo

            print(demo.run(config).summary())
            return None
        from batchscore import pipeline

        return pipeline.score(config)

    return _guarded(command, args)


def run_command(argv: list[str], action) -> int:
    """Runs `action(config)` for a `score`-style command line, with the CLI's logging, messages
    and exit codes; prints the `RunResult` it returns (if any). For jobs/*.py entry points."""
    args = build_parser().parse_args(argv)
    return _guarded(lambda: action(config_from_args(args)), args)


def _guarded(command, args: argparse.Namespace) -> int:
    """Runs `command()`; every failure ends as a logged message and an exit code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = command()
    except Exception as e:  # noqa: BLE001 - every failure ends as a message and an exit code
        code = _exit_code(e)
        log.error("%s: %s", type(e).__name__, e, exc_info=code == EXIT_FAILED)
        return code
    if result is not None:
        print(json.dumps(dataclasses.asdict(result), indent=2) if getattr(args, "json", False) else result.summary())
    return EXIT_OK


def _exit_code(e: Exception) -> int:
    from batchscore.budget import ErrorBudgetExceeded
    from batchscore.lease import OutputBusy
    from batchscore.listing import ListingError
    from batchscore.models import ModelError
    from batchscore.resume import ResumeError

    if isinstance(e, (ConfigError, ListingError, ModelError, ResumeError)):
        return EXIT_BAD_JOB
    if isinstance(e, OutputBusy):
        return EXIT_BUSY
    return EXIT_BUDGET if isinstance(e, ErrorBudgetExceeded) else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchscore", description="Batch image classification on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("score", "score images into committed Parquet output"),
                        ("validate", "check a job's config and print it resolved, as JSON"),
                        ("demo", "score the shipped demo digits with the shipped demo model (always re-scores); "
                                 "print accuracy")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", help="YAML job file; flags given here override it")
        if name == "score":
            p.add_argument("--json", action="store_true", help="print the result as JSON")
        _add_config_flags(p)
    p = sub.add_parser("inspect", help="report on the committed run in an output: counts, error codes, labels",
                       description="Report on the committed run in OUTPUT (local or a bucket URI), read from its "
                                   "manifest and the Parquet files it lists.")
    p.add_argument("output", help="the run's output directory or URI")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(ScoreConfig)
    helps = _attribute_docs()
    for f in dataclasses.fields(ScoreConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, help_ = hints[f.name], helps.get(f.name, "")
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_)
        elif f.name == "actors":
            parser.add_argument(flag, metavar="MIN[,MAX]", type=_actors, help=help_)
        elif typing.get_origin(hint) is tuple or tuple in map(typing.get_origin, typing.get_args(hint)):
            parser.add_argument(flag, nargs="+", metavar=f.name.upper(), help=help_)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), help=help_)
        else:
            parser.add_argument(flag, type=_scalar_type(hint), metavar=f.name.upper(), help=help_)


def config_from_args(args: argparse.Namespace) -> ScoreConfig:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in field_names()}
    if args.config:
        return ScoreConfig.from_yaml(args.config, **overrides)
    return ScoreConfig().with_overrides(**overrides)


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


if __name__ == "__main__":
    sys.exit(main())
