"""The plan: each settings file read once per run, the config read only where it is planned,
and the plan recorded in the manifest."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from batchscore import pipeline, plan
from batchscore.config import ScoreConfig, field_names
from batchscore.demo import SAMPLES
from batchscore.exceptions import ConfigError, ModelError, ResumeError

PACKAGE = Path(pipeline.__file__).parent
FIELDS = frozenset(field_names())
# The modules that may read a run's settings off its ScoreConfig: the plan and the pipeline,
# and the front doors that build one (the CLI, the schedule, the demo, the package's API).
CONFIG_READERS = {"batchscore.plan", "batchscore.pipeline", "batchscore.cli", "batchscore.schedule",
                  "batchscore.demo", "batchscore"}


class SpyingConfig(ScoreConfig):
    """A ScoreConfig that notes which batchscore modules read its settings."""

    readers: set[str] = set()

    def __getattribute__(self, name):
        if name in FIELDS:
            module = sys._getframe(1).f_globals.get("__name__", "")
            if module.startswith("batchscore") and module != "batchscore.config":
                SpyingConfig.readers.add(module)
        return object.__getattribute__(self, name)


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory, photos):
    from conftest import make_checkpoint

    path = make_checkpoint("vit", tmp_path_factory.mktemp("ml") / "ckpt", num_labels=4)
    config = json.loads((path / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    (path / "config.json").write_text(json.dumps(config))
    return path


class OpenCounter:
    """Counts `open` audit events (every way Python opens a file) of some paths, in this process."""

    def __init__(self, *paths: Path):
        self.counts = {os.path.realpath(p): 0 for p in paths}
        self.on = False
        sys.addaudithook(self.hook)  # audit hooks cannot be removed: `on` bounds it to the test

    def hook(self, event, args):
        if self.on and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path in self.counts:
                self.counts[path] += 1


def test_one_score_reads_each_settings_file_once_and_the_config_only_where_planned(ray_session, multi_label,
                                                                                   tmp_path):
    images = sorted(SAMPLES.glob("digit-000*.png"))[:4]
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("can: 0.3\ncarton: 0.7\n")
    labels = tmp_path / "labels.csv"
    truth = ["can" if i % 2 else '"can,carton"' for i in range(len(images))]  # single and multi-label rows
    labels.write_text("file,label\n" + "".join(f"{p.name},{t}\n" for p, t in zip(images, truth)))
    counter = OpenCounter(thresholds, labels)
    config = SpyingConfig(input=tuple(map(str, images)), output=str(tmp_path / "out"), model=str(multi_label),
                          thresholds=str(thresholds), label_source=str(labels), dtype="fp32")
    SpyingConfig.readers.clear()
    counter.on = True
    try:
        result = pipeline.score(config)
    finally:
        counter.on = False
    assert result.status == "committed" and result.rows == len(images)
    assert counter.counts == {os.path.realpath(thresholds): 1, os.path.realpath(labels): 1}
    readers = set(SpyingConfig.readers)
    assert readers and readers <= CONFIG_READERS, f"modules that read the run's config: {sorted(readers)}"
    assert "batchscore.plan" in readers and "batchscore.pipeline" in readers  # the spy sees reads at all
    # The manifest records the plan the rows came from: its thresholds and labels file as read.
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["plan"]["predict"]["thresholds"]["per_label"] == {"can": 0.3, "carton": 0.7}
    assert manifest["plan"]["evaluation"]["labels_file"] == str(labels)
    assert manifest["plan"]["rows_per_file"] == plan.CPU_ROWS_PER_FILE
    assert manifest["evaluation"]["rows"] == len(images)


def test_no_module_outside_the_planners_names_the_config():
    """Static half of the rule above: besides the config's own module, only the planners import
    ScoreConfig or read `config.<setting>`."""
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if name in CONFIG_READERS or name == "batchscore.config":
            continue
        tree = ast.parse(path.read_text())
        found = [f"line {n.lineno}: imports ScoreConfig" for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and any(a.name == "ScoreConfig" for a in n.names)]
        found += [f"line {n.lineno}: config.{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in ("config", "cfg")
                  and n.attr in FIELDS]
        if found:
            offenders[name] = found
    assert not offenders, offenders


def test_a_dated_template_is_refused_by_score_and_reported_by_validate(tmp_path):
    config = ScoreConfig(input=(str(tmp_path / "{date}"),), output=str(tmp_path / "out" / "{date}"))
    checks = plan.preflight(config, keep_going=True)
    assert "hold {date}: listed per date" in checks["inputs"].skipped
    with pytest.raises(ConfigError, match=r"input \[.*\{date\}'\], output '.*\{date\}' hold \{date\}: a dated "
                                          r"job scores one date at a time with batchscore nightly/backfill"):
        plan.prepare(config)
    assert not (tmp_path / "out").exists()


def test_preflight_stops_at_the_first_failure_unless_told_to_keep_going(tmp_path):
    config = ScoreConfig(input=(str(tmp_path / "nope"),), output=str(tmp_path / "out"), model=str(tmp_path / "nomodel"))
    first = plan.preflight(config)
    assert list(first) == ["model"] and first["model"].error is not None
    every = plan.preflight(config, keep_going=True)
    assert every["model"].error is not None and every["inputs"].error is not None
    assert every["task"].skipped == "not checked (model could not be)"


def test_resume_with_other_settings_is_refused_before_ray(tmp_path):
    """A staged run started with other settings (here top_k) is refused by the plan, before
    Ray starts and before the weights are hashed, by `validate` as by `score`."""
    from batchscore.outputs.staging import Staging

    config = ScoreConfig(input=(str(SAMPLES / "digit-0000.png"),), output=str(tmp_path / "out"), resume=True)
    job = plan.prepare(config)
    Staging(config.output, "20261207T000000Z-aaaaaaaa",
            info={"run_id": "r", "fingerprint": job.fingerprint("w"), "inputs": job.inputs.count,
                  "inputs_ids_sha256": job.inputs.ids_sha256})
    assert plan.prepare(config).inputs.count == 1  # the same settings: resumable
    with pytest.raises(ResumeError, match=r"started with other settings \(top_k: was 5, now 3\)"):
        plan.prepare(config.with_overrides(top_k=3))
    checks = plan.preflight(config.with_overrides(top_k=3), keep_going=True)
    assert isinstance(checks["staged run"].error, ResumeError)


def test_a_committed_run_is_compared_with_paths_as_typed_anywhere_and_with_its_thresholds(tmp_path, monkeypatch):
    """The manifest records local paths absolute: the same job typed from another folder is no
    change; another thresholds file or default threshold is one."""
    from batchscore.outputs import resume

    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    recorded = ScoreConfig(input=("photos",), output="out", thresholds="t.yaml").to_job()
    monkeypatch.chdir(tmp_path.parent)
    again = ScoreConfig(input=(f"{tmp_path.name}/photos",), output=f"{tmp_path.name}/out",
                        thresholds=f"{tmp_path.name}/t.yaml")
    assert resume.differences(recorded, again.to_job()) == {}
    assert set(resume.differences(recorded, again.with_overrides(threshold=0.7).to_job())) == {"threshold"}
    assert set(resume.differences(recorded, again.with_overrides(thresholds="other.yaml").to_job())) == {"thresholds"}


def test_bad_jobs_found_without_a_cluster(tmp_path):
    """Found by the plan, before Ray: a safetensors file cut short, decode on a GPU for actors
    without one, a dated output or baseline outside a dated job."""
    import shutil

    from batchscore.checkpoints.models import DEMO_CHECKPOINT

    cut = Path(shutil.copytree(DEMO_CHECKPOINT, tmp_path / "cut"))
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    image = (str(SAMPLES / "digit-0000.png"),)
    with pytest.raises(ModelError, match=r"model.safetensors: not a safetensors file \(it is cut short"):
        plan.prepare(ScoreConfig(input=image, output=str(tmp_path / "o"), model=str(cut)))
    with pytest.raises(ConfigError, match="decode_device=cuda needs inference actors with a GPU"):
        ScoreConfig(decode_device="cuda", gpus_per_actor=0)
    for dated in ({"output": str(tmp_path / "{date}")}, {"output": str(tmp_path / "o"), "baseline": "b/{date}"}):
        config = ScoreConfig(input=image, **dated)
        with pytest.raises(ConfigError, match=r"hold \{date\}, but no input does"):
            plan.prepare(config)
        assert "but no input does" in str(plan.preflight(config, keep_going=True)["dates"].error)  # validate too
    assert not list(tmp_path.glob("o*")) and not (tmp_path / "{date}").exists()
