"""The config object: frozen, typed, unknown keys rejected, YAML < flags, schema in step."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from batchscore.cli import build_parser, config_from_args
from batchscore.config import ScoreConfig, field_names
from batchscore.exceptions import ConfigError

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((ROOT / "schemas" / "job.schema.json").read_text())


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        ScoreConfig.from_dict({"input": ["x"], "topk": 3})
    assert "'topk'" in str(e.value) and "top_k" in str(e.value) and "batch_size" in str(e.value)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScoreConfig().top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("data, fragment", [
    ({"top_k": "five"}, "top_k: expected an integer, got 'five'"),
    ({"dtype": "int8"}, "dtype: expected one of auto, fp32, bf16, fp16, got 'int8'"),
    ({"actors": [3, 1]}, "actors: expected MIN[,MAX] with 1 <= MIN <= MAX, got 3,1"),
    ({"actors": [1, 2, 3]}, "actors: expected two values, got 3"),
    ({"batch_size": 0}, "batch_size: expected a positive number, got 0"),
    ({"overwrite": "yes"}, "overwrite: expected true or false, got 'yes'"),
    ({"extensions": ["jpg"]}, "extensions: expected endings that start with '.'"),
])
def test_bad_values_say_expected_and_got(data, fragment):
    with pytest.raises(ConfigError) as e:
        ScoreConfig.from_dict(data, where="job.yaml")
    assert fragment in str(e.value) and str(e.value).startswith("job.yaml: ")


def test_yaml_then_flags_override(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: [a, b]\noutput: out\ntop_k: 3\nactors: [1, 2]\n")
    args = build_parser().parse_args(["score", "--config", str(job), "--top-k", "7", "--actors", "2,4"])
    cfg = config_from_args(args)
    # from the file; relative paths in a job file are relative to its folder
    assert cfg.input == (str(tmp_path / "a"), str(tmp_path / "b")) and cfg.output == str(tmp_path / "out")
    assert cfg.top_k == 7 and cfg.actors == (2, 4)  # flags win
    assert cfg.batch_size is None  # default: measured by the actor


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: [a]\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: unknown key\(s\) 'batchsize'"):
        ScoreConfig.from_yaml(job)


def test_every_field_is_a_cli_flag():
    parser = build_parser()
    score = parser._subparsers._group_actions[0].choices["score"]  # noqa: SLF001
    flags = {a.dest for a in score._actions}  # noqa: SLF001
    assert set(field_names()) <= flags


def test_to_dict_round_trips():
    cfg = ScoreConfig(input=("a",), output="o", actors=(1, 3), top_k=0)
    assert ScoreConfig.from_dict(cfg.to_dict()) == cfg


_JSON_TYPES = {str: {"string"}, int: {"integer"}, float: {"number"}, bool: {"boolean"}}


def _schema_types(prop: dict) -> set[str]:
    if "enum" in prop:
        return {"enum"}
    t = prop["type"]
    return set(t) if isinstance(t, list) else {t}


def test_job_schema_matches_the_dataclass():
    """Same keys, same defaults, compatible types: the schema cannot drift from the code."""
    props = SCHEMA["properties"]
    assert SCHEMA["additionalProperties"] is False
    assert list(props) == field_names()
    hints = typing.get_type_hints(ScoreConfig)
    defaults = ScoreConfig().to_dict()
    for name, prop in props.items():
        assert prop["default"] == defaults[name], name
        hint = hints[name]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Literal:
            assert set(prop["enum"]) == set(args), name
        elif origin is tuple:
            assert _schema_types(prop) == {"array"}, name
        elif origin in (typing.Union, __import__("types").UnionType):
            inner = [a for a in args if a is not type(None)][0]
            inner_types = {"array"} if typing.get_origin(inner) is tuple else _JSON_TYPES[inner]
            assert _schema_types(prop) == inner_types | {"null"}, name
        else:
            assert _schema_types(prop) == _JSON_TYPES[hint], name


@pytest.mark.parametrize("job", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_files_are_valid(job):
    data = yaml.safe_load(job.read_text())
    jsonschema.validate(data, SCHEMA)
    ScoreConfig.from_dict(data, where=str(job))
    commands = ("batchscore score --config", "jobs/score.py --config", "jobs/nightly.py --config")
    assert any(c in job.read_text() for c in commands), "every job file shows the command that runs it"


def test_schema_rejects_what_the_dataclass_rejects():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"topk": 3}, SCHEMA)
    with pytest.raises(ConfigError):
        ScoreConfig.from_dict({"topk": 3})
