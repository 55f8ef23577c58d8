"""Bad jobs fail fast: before Ray starts, in about a second, with their
exit code and a message saying what and where; `validate` runs the same checks; the CLI's
small sharp edges (repeated flags, closed pipes, `inspect` without a run, `--help`).

Only `test_repeated_inputs_are_scored_and_top_k_is_capped` starts Ray (its own, which the
command must stop on exit). The bad jobs run
`batchscore score` as a subprocess with RAY_ADDRESS pointing at a closed port: a run that
reached Ray would fail there with exit 4 (or hang), so exit 2 proves the check came first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore import cli
from batchscore.checkpoints import models
from batchscore.checkpoints.models import DEMO_CHECKPOINT
from batchscore.config import ScoreConfig
from batchscore.exceptions import ConfigError, ListingError, ModelError
from batchscore.inputs import listing
from batchscore.plan import listing_spec

ROOT = Path(__file__).parent.parent
SAMPLES = ROOT / "batchscore" / "demo" / "samples"
# Ray refuses to connect here at once; reaching Ray at all is what these tests forbid.
NO_RAY = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}


def batchscore(*args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "batchscore.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env or NO_RAY, timeout=timeout)
    return proc, time.monotonic() - started


def demo_checkpoint(dst: Path) -> Path:
    return Path(shutil.copytree(DEMO_CHECKPOINT, dst))


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


# -- bad jobs fail before Ray ---------------------------------------------------------------

def _missing_model(tmp):
    return ["--model", tmp / "nope"], rf"model '{tmp}/nope'.*does not exist or is not a directory"


def _no_preprocessor(tmp):
    ckpt = demo_checkpoint(tmp / "ckpt")
    (ckpt / "preprocessor_config.json").unlink()
    return ["--model", ckpt], rf"preprocessor_config.json is missing from {ckpt}"


def _pickle_only(tmp):
    ckpt = demo_checkpoint(tmp / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    return ["--model", ckpt], r"only pickle weights found \(pytorch_model.bin\).*unless --allow-pickle"


def _missing_input(tmp):
    return ["--input", "nope/photos"], rf"input 'nope/photos': no such file or directory \(looked for {tmp}/nope/photos\)"


def _wrong_format(tmp):
    return ["--input-format", "tar"], r"no tar input found"


def _header_only_manifest(tmp):
    manifest = tmp / "list.csv"
    manifest.write_text("uri,label\n")
    return ["--input", manifest], rf"manifest {manifest}: has no rows \(empty, or a header only\)"


def _passthrough_on_images(tmp):
    return ["--passthrough", "label"], (r"passthrough \['label'\] refused: passthrough applies to manifest and "
                                        r"Parquet columns and tar members, but the inputs .* are plain image files")


def _mistyped_key(tmp):
    job = tmp / "job.yaml"
    job.write_text("topk: 3\n")
    return ["--config", job], r"unknown key\(s\) 'topk' \(did you mean 'top_k'\?\); valid keys are: input, "


def _thresholds_for_softmax(tmp):
    thresholds = tmp / "t.yaml"
    thresholds.write_text("7: 0.3\n")
    return ["--thresholds", thresholds], rf"thresholds: {thresholds} sets per-label thresholds, but the checkpoint is single-label"


def _missing_labels_file(tmp):
    return ["--label-source", tmp / "labels.csv"], rf"label_source: cannot read labels file {tmp}/labels.csv"


def _dated_output_of_a_plain_job(tmp):
    return ["--output", tmp / "out" / "{date}"], r"output '.*/out/\{date\}' hold \{date\}, but no input does"


def _baseline_without_a_run(tmp):
    return ["--baseline", tmp / "yesterday"], rf"baseline {tmp}/yesterday: no committed run there"


@pytest.mark.parametrize("case", [_missing_model, _no_preprocessor, _pickle_only, _missing_input, _wrong_format,
                                  _header_only_manifest, _passthrough_on_images, _mistyped_key,
                                  _thresholds_for_softmax, _missing_labels_file, _baseline_without_a_run,
                                  _dated_output_of_a_plain_job],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_bad_job_fails_before_ray_with_exit_2_and_validate_refuses_it_alike(tmp_path, case):
    """`score` refuses a bad job before Ray (exit 2, one ERROR line, nothing written), and
    `validate` refuses the same job with the same line: both run `plan.preflight`."""
    args, message = case(tmp_path)
    out = tmp_path / "out"
    base = {"--input": str(SAMPLES), "--output": str(out)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(value)
    flags = [x for kv in base.items() for x in kv]
    proc, seconds = batchscore("score", *flags, cwd=tmp_path)
    print(f"FIGURE seconds to error, score {case.__name__.lstrip('_')}: {seconds:.2f}s (exit {proc.returncode})")
    assert proc.returncode == cli.EXIT_BAD_JOB, proc.stderr
    refused = error_line(proc.stderr)
    assert re.search(message, refused), proc.stderr
    assert not out.exists(), "nothing may be staged or written for a bad job"
    checked, _ = batchscore("validate", *flags, cwd=tmp_path)
    assert checked.returncode == cli.EXIT_BAD_JOB and checked.stdout == "", checked.stderr
    assert error_line(checked.stderr).split(" ERROR ", 1)[1] == refused.split(" ERROR ", 1)[1]
    assert not out.exists()


def test_empty_jsonl_and_parquet_manifests_are_listing_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    pq.write_table(pa.table({"uri": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name, fmt in (("empty.jsonl", "auto"), ("empty.parquet", "manifest")):
        config = ScoreConfig(input=(str(tmp_path / name),), output="o", input_format=fmt)
        with pytest.raises(ListingError, match=rf"manifest {tmp_path / name}: has no rows"):
            listing.list_inputs(listing_spec(config))


# -- models.check ---------------------------------------------------------------------------

def test_check_raises_what_resolve_raises(tmp_path):
    """One set of messages: every file-level failure reads the same from check and resolve."""
    cases = {}
    cases["missing"] = tmp_path / "missing"
    cases["no_preprocessor"] = demo_checkpoint(tmp_path / "np")
    (cases["no_preprocessor"] / "preprocessor_config.json").unlink()
    cases["pickle_only"] = demo_checkpoint(tmp_path / "pk")
    (cases["pickle_only"] / "model.safetensors").rename(cases["pickle_only"] / "pytorch_model.bin")
    cases["bare_pickle"] = demo_checkpoint(tmp_path / "bare")
    (cases["bare_pickle"] / "model.safetensors").rename(cases["bare_pickle"] / "weights.pth")
    cases["no_head_or_encoder"] = demo_checkpoint(tmp_path / "mim")  # headless ViTModel is valid (task embed)
    config = json.loads((cases["no_head_or_encoder"] / "config.json").read_text())
    (cases["no_head_or_encoder"] / "config.json").write_text(
        json.dumps({**config, "architectures": ["ViTForMaskedImageModeling"]}))
    cases["bad_json"] = demo_checkpoint(tmp_path / "badjson")
    (cases["bad_json"] / "config.json").write_text("{not json")
    cases["crop_pct"] = demo_checkpoint(tmp_path / "croppct")
    pp = json.loads((cases["crop_pct"] / "preprocessor_config.json").read_text())
    (cases["crop_pct"] / "preprocessor_config.json").write_text(json.dumps({**pp, "crop_pct": 0.875}))
    cases["missing_shard"] = demo_checkpoint(tmp_path / "shard")
    (cases["missing_shard"] / "model.safetensors").unlink()
    (cases["missing_shard"] / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    for name, ckpt in cases.items():
        with pytest.raises(ModelError) as checked:
            models.check(str(ckpt))
        with pytest.raises(ModelError) as resolved:
            models.resolve(str(ckpt))
        assert str(checked.value) == str(resolved.value), name
        print(f"check {name}: {checked.value}")


def test_check_reads_a_bucket_folder_without_downloading_weights():
    """A URI is listed and its two JSON files read (here fsspec's in-memory store)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("config.json", "preprocessor_config.json"):
        fs.pipe(f"/bs-check/vit-tiny/{name}", (DEMO_CHECKPOINT / name).read_bytes())
    fs.pipe("/bs-check/vit-tiny/model.safetensors", b"not read by check")
    checked = models.check("memory://bs-check/vit-tiny/")
    assert (checked.name, len(checked.labels), checked.weights) == ("vit-tiny", 10, "model.safetensors")
    fs.rm("/bs-check/vit-tiny/preprocessor_config.json")
    with pytest.raises(ModelError, match="preprocessor_config.json is missing from memory://bs-check/vit-tiny$"):
        models.check("memory://bs-check/vit-tiny/")
    with pytest.raises(ModelError, match="memory://bs-check/none does not exist or is not a directory"):
        models.check("memory://bs-check/none")
    fs.rm("/bs-check", recursive=True)


def test_check_imports_neither_transformers_nor_torch(tmp_path):
    ckpt = demo_checkpoint(tmp_path / "pk")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    code = ("import sys, time; t = time.monotonic(); from batchscore.checkpoints import models; "
            f"a = models.check(None); b = models.check({str(ckpt)!r}, allow_pickle=True); "
            "print(a.summary()); print(b.summary()); print(round(time.monotonic() - t, 3)); "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    demo, pickled, seconds = proc.stdout.splitlines()
    print(f"FIGURE models.check (demo, then a pickle checkpoint), import included: {seconds}s")
    assert demo.startswith("batchscore-demo-digits (vit): 10 labels, weights model.safetensors (safetensors)")
    assert "weights pytorch_model.bin (pickle)" in pickled


# -- validate -------------------------------------------------------------------------------

def test_validate_fails_on_a_missing_model_and_a_missing_input(tmp_path):
    proc, seconds = batchscore("validate", "--input", tmp_path / "nope", "--model", tmp_path / "nomodel",
                               "--output", tmp_path / "out")
    print(f"FIGURE seconds to error, validate missing input and model: {seconds:.2f}s")
    assert proc.returncode == cli.EXIT_BAD_JOB and proc.stdout == ""
    assert f"validate: inputs: FAILED: input '{tmp_path}/nope': no such file or directory" in proc.stderr
    assert f"validate: model: FAILED: model '{tmp_path}/nomodel': expected a local" in proc.stderr
    assert "validate: 2 check(s) FAILED" in proc.stderr
    # the first failure is raised, as `score` raises it: the checkpoint is checked first (milliseconds)
    assert "ModelError: model" in error_line(proc.stderr)


def test_validate_lists_repeated_inputs(tmp_path, capsys):
    a, b = SAMPLES / "digit-0000.png", SAMPLES / "digit-0001.png"
    code = cli.main(["validate", "--input", str(a), "--input", str(b), "--output", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    assert json.loads(out)["input"] == [str(a), str(b)]
    assert "validate: inputs: 2 image file(s), format files" in err
    assert "validate: model: batchscore-demo-digits (vit): 10 labels, weights model.safetensors" in err
    assert "validate: ok: every check before Ray passed" in err
    # every list flag adds up, repeated or with several values
    args = cli.build_parser().parse_args(["score", "--formats", "JPEG", "--formats", "PNG", "WEBP",
                                          "--passthrough", "a", "--passthrough", "b", "--extensions", ".x"])
    config = cli.config_from_args(args)
    assert (config.formats, config.passthrough, config.extensions) == (("JPEG", "PNG", "WEBP"), ("a", "b"), (".x",))


def test_validate_is_quick_and_starts_nothing():
    proc, seconds = batchscore("validate", "--config", "jobs/configs/demo.yaml", "--top-k", "50")
    print(f"FIGURE validate demo.yaml (360 images listed, checkpoint checked), whole process: {seconds:.2f}s")
    assert proc.returncode == 0, proc.stderr
    assert "validate: inputs: 360 image file(s), format files" in proc.stderr
    assert "top_k=50 but the checkpoint has 10 classes: using 10" in proc.stderr
    assert json.loads(proc.stdout)["input"] == [str(SAMPLES)]


# -- job files: paths relative to the file ------------------------------------------------

def test_job_file_paths_are_relative_to_the_job_file(tmp_path, monkeypatch, capsys):
    jobs = tmp_path / "project" / "jobs"
    jobs.mkdir(parents=True)
    shutil.copytree(SAMPLES, tmp_path / "project" / "images")
    demo_checkpoint(tmp_path / "project" / "ckpt")
    (jobs / "job.yaml").write_text("input: [../images]\noutput: ../scores\nmodel: ../ckpt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = ScoreConfig.from_yaml(jobs / "job.yaml")
    project = tmp_path / "project"
    assert config.input == (str(project / "images"),)
    assert (config.output, config.model) == (str(project / "scores"), str(project / "ckpt"))
    # a flag stays relative to the working directory; URIs are never touched
    assert ScoreConfig.from_yaml(jobs / "job.yaml", output="here").output == "here"
    (jobs / "remote.yaml").write_text("input: ['gs://b/in/', s3://b/x.png]\noutput: gs://b/out/\n")
    assert ScoreConfig.from_yaml(jobs / "remote.yaml").input == ("gs://b/in/", "s3://b/x.png")

    assert cli.main(["validate", "--config", str(jobs / "job.yaml")]) == cli.EXIT_OK
    assert "validate: inputs: 360 image file(s)" in capsys.readouterr().err

    # a missing input says where it looked
    (jobs / "typo.yaml").write_text("input: [../imagez]\noutput: ../scores\n")
    with pytest.raises(ListingError, match=rf"input '{project}/imagez': no such file or directory"):
        listing.list_inputs(listing_spec(ScoreConfig.from_yaml(jobs / "typo.yaml")))
    with pytest.raises(ListingError, match=rf"input 'imagez': no such file or directory "
                                                   rf"\(looked for {elsewhere}/imagez\)"):
        listing.list_inputs(listing_spec(ScoreConfig(input=("imagez",), output="o")))


def test_shipped_demo_job_reads_the_demo_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ScoreConfig.from_yaml(ROOT / "jobs" / "configs" / "demo.yaml")
    assert config.input == (str(SAMPLES),) and config.output == str(ROOT / "runs" / "demo")


# -- did you mean ---------------------------------------------------------------------------

def test_did_you_mean_for_mistyped_keys():
    with pytest.raises(ConfigError) as e:
        ScoreConfig.from_dict({"topk": 3, "zzz": 1}, where="job.yaml")
    message = str(e.value)
    assert message.startswith("job.yaml: unknown key(s) 'topk' (did you mean 'top_k'?), 'zzz'; valid keys are: ")
    assert "batch_size" in message and "progress_seconds" in message
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) 'batchsize' \(did you mean 'batch_size'\?\)"):
        ScoreConfig().with_overrides(batchsize=3)


# -- passthrough ----------------------------------------------------------------------------

def test_passthrough_is_refused_for_plain_images(tmp_path):
    with pytest.raises(ConfigError, match=r"passthrough \['cls'\] refused: passthrough applies to manifest and "
                                          r"Parquet columns and tar members, but input_format is files"):
        ScoreConfig(input=(str(SAMPLES),), output="o", input_format="files", passthrough=("cls",))
    with pytest.raises(ListingError, match="are plain image files"):
        listing.list_inputs(listing_spec(ScoreConfig(input=(str(SAMPLES / "digit-0000.png"),), output="o", passthrough=("cls",))))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"uri,label\n{SAMPLES / 'digit-0000.png'},zero\n")
    (entry,) = listing.list_inputs(listing_spec(ScoreConfig(input=(str(manifest),), output="o", passthrough=("label",))))
    assert entry.passthrough == {"label": "zero"}


# -- inspect, closed pipes, --help ----------------------------------------------------------

def test_inspect_without_a_committed_run_exits_6(tmp_path):
    (tmp_path / "_staging").mkdir()
    for folder in (tmp_path, tmp_path / "missing"):
        proc, seconds = batchscore("inspect", folder)
        print(f"FIGURE seconds to error, inspect {folder.name}: {seconds:.2f}s")
        assert proc.returncode == cli.EXIT_NOT_COMMITTED == 6 and proc.stdout == ""
        assert "no committed run (_SUCCESS is missing)" in error_line(proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["validate", "--input", str(SAMPLES), "--output", "o"], ["score", "--help"],
                                  ["--help"]], ids=["validate", "score-help", "help"])
def test_closed_pipe_is_quiet(tmp_path, args):
    """The reader is gone before batchscore writes (`| head -1` at its worst): no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "batchscore.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=NO_RAY)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert code == 0, err
    # and through a real pipe
    shell = subprocess.run(f"{sys.executable} -m batchscore.cli {' '.join(args)} | head -1", shell=True,
                           capture_output=True, text=True, cwd=tmp_path, env=NO_RAY, timeout=60)
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr


def test_help_shows_defaults_and_exit_codes():
    parser = cli.build_parser()
    score = parser._subparsers._group_actions[0].choices["score"]  # noqa: SLF001
    text = " ".join(score.format_help().split())
    for fragment in ("(default: 5)", "(default: 0.1)", "(default: auto)", "(default: off)",
                     "Repeatable: the values add up. (default: JPEG MPO PNG WEBP GIF BMP TIFF AVIF HEIF)",
                     "exit status:", "2 bad job", "5 another run holds the output's lease",
                     "6 inspect, report: the output (or the --baseline named) holds no committed run"):
        assert fragment in text, fragment
    assert "exit status:" in parser.format_help()


# -- end to end (on the session's Ray) --------------------------------------------------------

def test_repeated_inputs_are_scored_and_top_k_is_capped(tmp_path):
    """The `batchscore` command end to end on a local Ray of its own, which it stops on exit:
    no process of that Ray session outlives the command."""
    a, b = SAMPLES / "digit-0000.png", SAMPLES / "digit-0003.jpg"
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc, seconds = batchscore("score", "--input", a, "--input", b, "--output", out, "--top-k", "50",
                               "--batch-size", "8", "--json", env=env, timeout=300)
    print(f"FIGURE score of 2 images end to end, local Ray started and stopped: {seconds:.2f}s")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"] == 2  # stdout holds the result alone
    session = re.search(r"/(session_[0-9_-]+)/logs", proc.stderr)
    assert session, proc.stderr
    assert _processes_of(session.group(1)) == [], "the command left its Ray's processes behind"
    warning = "top_k=50 but the checkpoint has 10 classes: using 10"
    assert proc.stderr.count(warning) == 1, proc.stderr
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["top_k"] == 10 and manifest["config"]["top_k"] == 50
    assert manifest["counts"]["rows"] == 2
    rows = pq.read_table(out / manifest["files"][0]["name"]).to_pylist()
    assert sorted(r["id"] for r in rows) == [str(a), str(b)]
    assert all(len(r["labels"]) == 10 for r in rows)


def _processes_of(session: str, wait: float = 30.0) -> list[str]:
    """Command lines of live processes that name Ray session `session` (GCS, raylet, agents,
    workers all do), after waiting up to `wait` s for them to go: workers leave on their own
    once their raylet is gone."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if session in cmdline and state != "Z":
                alive.append(f"{pid}: {cmdline[:120]}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_stdout_holds_only_the_result_when_the_command_runs_ray():
    """What Ray's processes and libraries print to stdout while `batchscore score` runs (the
    raylet's errors, workers' prints: all inherit descriptor 1) goes to stderr; the result
    alone goes to stdout."""
    code = ("import os, sys; from batchscore import cli; cli._keep_stdout_for_results(); "
            "print('stray from python'); sys.stdout.flush(); os.system('echo stray from a child process'); "
            "cli._out('the result'); cli._flush_stdout()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the result\n"
    assert "stray from python" in proc.stderr and "stray from a child process" in proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(caplog):
    """Ctrl-C during a run: exit 130 (as shells report SIGINT, listed in --help) with one
    line saying nothing was committed, not a traceback from Ray Data's internals."""
    import argparse

    def interrupted():
        raise KeyboardInterrupt

    with caplog.at_level("ERROR", logger="batchscore"):
        code = cli._guarded(interrupted, argparse.Namespace())
    assert code == cli.EXIT_INTERRUPTED == 130
    assert [r.getMessage() for r in caplog.records] == [
        "interrupted: nothing committed; the parts staged so far stay for --resume"]
    assert all(r.exc_info is None for r in caplog.records)
    assert "130 interrupted (Ctrl-C)" in cli.EXIT_HELP


def test_validate_says_when_another_run_holds_the_output(tmp_path, capsys):
    """A live run's lease on the output: validate passes (the job is fine) but says that
    `score` would exit 5 now; once the lease is released it says nothing of it."""
    from batchscore.outputs.lease import Lease

    out = tmp_path / "out"
    args = ["validate", "--input", str(SAMPLES / "digit-0000.png"), "--output", str(out)]
    lease = Lease(str(out), "run-elsewhere").acquire()
    try:
        assert cli.main(args) == cli.EXIT_OK
        err = capsys.readouterr().err
        assert "busy now, score would exit 5: output" in err and "run run-elsewhere" in err
    finally:
        lease.release()
    assert cli.main(args) == cli.EXIT_OK
    assert "busy now" not in capsys.readouterr().err


def test_a_closed_stdout_is_not_a_crash(tmp_path):
    """`batchscore validate ... >&-` (stdout closed): the checks run and say so on stderr,
    exit 0, no traceback."""
    proc = subprocess.run(f"{sys.executable} -m batchscore.cli validate --input {SAMPLES / 'digit-0000.png'} "
                          f"--output {tmp_path / 'out'} >&-", shell=True, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "validate: ok: every check before Ray passed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit(15)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_after_the_commit_keeps_the_committed_result(tmp_path, ray_session, monkeypatch, caplog, stop):
    """Interrupted while the report is written (Ctrl-C, or SIGTERM: the CLI's handler raises
    SystemExit(15)), the run is already committed: score() says so and returns it (the CLI
    exits 0), instead of "stopped: nothing committed"."""
    from batchscore import pipeline
    from batchscore.reporting import report

    def interrupted(*args):
        raise stop

    monkeypatch.setattr(report, "after_commit", interrupted)
    with caplog.at_level("WARNING", logger="batchscore"):
        result = pipeline.score(ScoreConfig(input=(str(SAMPLES / "digit-0000.png"),), output=str(tmp_path / "out"),
                                            batch_size=8))
    assert result.status == "committed" and (tmp_path / "out" / "_SUCCESS").exists()
    assert any("interrupted while writing _report.html: the run is committed" in r.getMessage() for r in caplog.records)


def test_sigterm_waits_while_ray_starts_then_exits_15(tmp_path):
    """`runtime.sigterm_kept`, round `ray.init`: a SIGTERM that comes meanwhile waits (blocked
    in the main thread and in the threads started then, as Ray's are), and the Python handler
    is installed again at the C level afterwards. Ray's core worker installs a C++ handler while
    it connects (a SIGTERM then crashed the CLI with SIGSEGV, rc 139); here a C-level SIG_IGN
    installed behind Python's back stands for it: without the reinstall the SIGTERM would be
    ignored and the script would print "survived"."""
    script = tmp_path / "kept.py"
    script.write_text(textwrap.dedent("""
        import ctypes, os, signal, sys, threading
        from batchscore.driver import runtime
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(15))
        masks = []
        with runtime.sigterm_kept():
            ctypes.CDLL(None).signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN, as a C library would
            t = threading.Thread(target=lambda: masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            t.start(); t.join()
            os.kill(os.getpid(), signal.SIGTERM)
            print("waited", signal.SIGTERM in masks[0], flush=True)
        print("survived", flush=True)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 15, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["waited", "True"], proc.stdout
