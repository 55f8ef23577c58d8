"""`batchscore inspect` and `batchscore report`: what a committed run holds, and how it compares.

`inspect` reads exactly what a reader would (the files the manifest of the run named in
`_SUCCESS` lists), local or in a bucket, and reports: the run and model, rows, scored and
error counts, error rows by code, the histogram of top-1 labels, throughput and timings, the
evaluation against known labels (the manifest's `evaluation`) and the drift against a
baseline run (`batchscore.reporting.drift`). Counts are taken from the Parquet rows and checked against
the manifest's; a mismatch is reported, not hidden.

`report` writes the same as one self-contained HTML page, `_report.html` beside the manifest
(every run writes one after its commit): counts and error codes, throughput over the run,
the label histogram, a grid of sample images with their top labels (and a few error rows),
the evaluation with its confusion matrix, and the drift table. Charts are matplotlib figures
inlined as SVG, thumbnails inlined as JPEG data URIs: the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import logging
import threading

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from batchscore.inputs import fs as fsutil
from batchscore.outputs import committed
from batchscore.outputs.output import REPORT, read_committed
from batchscore.outputs.result import _drift_line, _evaluation_line
from batchscore.reporting import drift

TOP_LABELS = 20
SAMPLES = 24  # scored rows in the sample grid
ERROR_SAMPLES = 6
THUMBNAIL = 112  # px
MATRIX_LABELS = 30  # a confusion matrix beyond this many classes is shown as its most confused pairs

log = logging.getLogger("batchscore")


def inspect_output(output: str, baseline: str | None = None, thresholds=None) -> dict:
    """The report of the committed run in `output`; with drift against `baseline` (default:
    the baseline the run was scored with, e.g. the previous nightly partition; if that one
    holds no committed run any more, the drift is None).

    Raises:
        NotCommitted: `output` holds no committed run (no `_SUCCESS`), or does not exist; or
            `baseline`, given, holds no committed run.
        SinkError: the committed run's manifest or files cannot be read.
    """
    manifest = committed.manifest_of(output)
    table = read_committed(output)
    errors = table.column("error_code")
    error_rows = table.num_rows - errors.null_count
    by_code = collections.Counter(c for c in errors.to_pylist() if c is not None)
    histogram: collections.Counter = collections.Counter()
    if "labels" in table.column_names:
        # Multi-label rows may hold no label (none above its threshold): counted as "(none)".
        labels = table.filter(pc.is_null(table.column("error"))).column("labels")
        lengths = pc.list_value_length(labels)
        top1 = pc.list_element(labels.filter(pc.greater(lengths, 0)), 0).to_pylist()
        histogram = collections.Counter(t for t in top1 if t is not None)
        empty = pc.sum(pc.equal(lengths, 0)).as_py() or 0
        if empty:
            histogram[drift.NONE_LABEL] += empty
    counts = manifest["counts"]
    found = {"rows": table.num_rows, "scored": table.num_rows - error_rows, "errors": error_rows,
             "errors_by_code": dict(sorted(by_code.items()))}
    mismatches = {k: {"manifest": counts.get(k), "files": v} for k, v in found.items() if counts.get(k) != v}
    explicit = bool(baseline)  # named by the caller: one without a committed run is an error
    baseline = baseline or manifest.get("config", {}).get("baseline")
    scores = committed.with_scores(manifest, output, table)["scores"]
    return {
        "output": output,
        "run_id": manifest["run_id"],
        "model": manifest["model"]["tag"],
        "model_type": manifest["model"]["model_type"],
        "task": manifest.get("task"),  # task, pool, dim of an embeddings run (None before v2)
        **found,
        "top1_labels": dict(histogram.most_common(TOP_LABELS)),
        "distinct_top1_labels": len(histogram),
        "mean_top1_probability": scores.get("mean_top1_probability"),
        "images_per_second": manifest["timings"]["images_per_second"],
        "total_seconds": manifest["timings"]["total_seconds"],
        "files": len(manifest["files"]),
        "started_at": manifest.get("started_at"),
        "finished_at": manifest.get("finished_at"),
        "resumed": manifest.get("attempt", {}).get("resumed", False),
        "mismatches": mismatches,
        "thresholds": manifest.get("thresholds"),
        "evaluation": _brief_evaluation(manifest.get("evaluation")),
        "drift": drift.against(output, baseline, thresholds, required=explicit),
    }


def _brief_evaluation(ev: dict | None) -> dict | None:
    """The evaluation without its bulky parts (the confusion counts and calibration bins stay
    in the manifest and the HTML report)."""
    if not ev:
        return ev
    return {k: v for k, v in ev.items() if k not in ("confusion", "ece_bins")}


def format_report(report: dict) -> str:
    codes = ", ".join(f"{k}={v}" for k, v in report["errors_by_code"].items()) or "none"
    lines = [
        f"run {report['run_id']} in {report['output']}",
        f"model: {report['model']} ({report['model_type']})",
        f"rows: {report['rows']}  scored: {report['scored']}  errors: {report['errors']} ({codes})",
        f"throughput: {report['images_per_second']:.1f} images/s; total {report['total_seconds']:.1f}s; "
        f"{report['files']} part file(s); {report['started_at']} → {report['finished_at']}"
        + ("; resumed" if report["resumed"] else ""),
    ]
    task = report.get("task") or {}
    if task.get("pool"):  # the run embeds; an embed-only run has no labels to count
        lines.append(f"task: {task['task']} (pool {task['pool']}, dim {task.get('dim')}, {task.get('dtype')}"
                     + (", L2-normalised" if task.get("normalize") else "") + ")")
    if task.get("task", "classify") != "embed":
        lines.append(f"top-1 labels ({report['distinct_top1_labels']} distinct):")
    width = max((len(k) for k in report["top1_labels"]), default=0)
    most = max(report["top1_labels"].values(), default=1)
    for label, n in report["top1_labels"].items():
        lines.append(f"  {label:<{width}}  {n:>7}  {'#' * max(1, round(30 * n / most))}")
    for line in (_evaluation_line(report.get("evaluation")), _drift_line(report.get("drift"))):
        if line:
            lines.append(line)
    for key, m in report["mismatches"].items():
        lines.append(f"MISMATCH {key}: manifest says {m['manifest']}, the files hold {m['files']}")
    return "\n".join(lines)


# -- the HTML report ----------------------------------------------------------------------------


def prepare() -> None:
    """Imports what the report draws with (matplotlib, ~0.5 s) in a background thread, so that
    `after_commit` does not add it to the end of a run: the pipeline calls this while the
    workers score and the driver mostly waits."""

    def load() -> None:
        try:
            # lazy: matplotlib only for the page; loaded here, in the background
            import matplotlib.backends.backend_svg  # noqa: F401 - what `_svg` saves with
            import matplotlib.figure  # noqa: F401
        except Exception:  # noqa: BLE001 - `after_commit` reports a missing matplotlib itself
            pass

    threading.Thread(target=load, name="batchscore-report-imports", daemon=True).start()


def after_commit(output: str, baseline: str | None, thresholds) -> str | None:
    """Writes `_report.html` for the run just committed in `output`, against `baseline` with
    the drift `thresholds` (`drift.Thresholds`); a failure is logged, never raised (the run is
    committed either way)."""
    try:
        # required=False: a baseline gone since the run was checked leaves the drift out, not the page
        path = write_report(output, baseline, thresholds, required=False)
        log.info("report: %s", path)
        return path
    except Exception as e:  # noqa: BLE001 - the report is derived; the commit stands
        log.warning("could not write %s for %s: %s: %s", REPORT, output, type(e).__name__, e)
        return None


def write_report(output: str, baseline: str | None = None, thresholds=None, path: str | None = None,
                 required: bool = True) -> str:
    """Writes the HTML report of the committed run in `output` (to `path`, default
    `<output>/_report.html`); returns where it went.

    Raises:
        NotCommitted: `output` holds no committed run; or `baseline`, given, holds none
            (unless not `required`: then the page has no drift figures).
    """
    page = render(output, baseline, thresholds, required=required)
    if path is None:
        fs, root = fsutil.resolve(output)
        target = f"{root.rstrip('/')}/{REPORT}"
        fs.pipe_file(target, page.encode())
        return fsutil.full_uri(fs, target)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def render(output: str, baseline: str | None = None, thresholds=None, required: bool = True) -> str:
    """The report page of the committed run in `output`, as one HTML string (`baseline`,
    given and `required`, must hold a committed run; the run's own recorded baseline need not)."""
    manifest = committed.with_scores(committed.manifest_of(output), output)
    explicit = bool(baseline) and required
    baseline = baseline or manifest.get("config", {}).get("baseline")
    found = drift.against(output, baseline, thresholds, required=explicit)
    counts, timings, scores = manifest["counts"], manifest["timings"], manifest["scores"]
    e = html.escape
    sections = [f"<h1>batchscore run <code id='run-id'>{e(manifest['run_id'])}</code></h1>",
                f"<p class='sub'>{e(output)} · model {e(manifest['model']['tag'])} · "
                f"{e(str(manifest.get('started_at')))} → {e(str(manifest.get('finished_at')))}</p>"]
    codes = "".join(f"<tr><td>{e(k)}</td><td class='n'>{v}</td></tr>" for k, v in counts["errors_by_code"].items())
    sections.append(
        "<section id='counts'><h2>Counts</h2><table class='kv'>"
        f"<tr><th>inputs</th><td class='n'>{counts['inputs']}</td></tr>"
        f"<tr><th>rows</th><td class='n' id='rows'>{counts['rows']}</td></tr>"
        f"<tr><th>scored</th><td class='n' id='scored'>{counts['scored']}</td></tr>"
        f"<tr><th>errors</th><td class='n' id='errors'>{counts['errors']}</td></tr>"
        f"<tr><th>mean top-1 probability</th><td class='n'>{_num(scores.get('mean_top1_probability'))}</td></tr>"
        f"<tr><th>throughput</th><td class='n'>{timings['images_per_second']:.1f} images/s scoring, "
        f"{timings['total_seconds']:.1f} s in all</td></tr></table>"
        + (f"<h3>Error rows by code</h3><table><tr><th>code</th><th>rows</th></tr>{codes}</table>" if codes else "")
        + "</section>")
    charts = []
    if len(scores.get("timeline", [])) > 1:
        charts.append(_timeline_chart(scores["timeline"]))
    charts.append(_histogram_chart(drift.distribution(scores)))
    charts.append(_confidence_chart(scores.get("confidence_bins") or []))
    sections.append("<section id='labels'><h2>Throughput and labels</h2><div class='charts'>"
                    + "".join(f"<figure>{c}</figure>" for c in charts if c) + "</div></section>")
    sections.append(_samples(output, manifest))
    if manifest.get("evaluation"):
        sections.append(_evaluation(manifest["evaluation"]))
    sections.append(_drift(found))
    return _PAGE.format(title=e(f"batchscore {manifest['run_id']}"), body="\n".join(sections))


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _figure(width: float, height: float):
    # No pyplot: no global backend, safe in threads and notebooks.
    # lazy: matplotlib only when a page is drawn (`prepare` loads it in the background during a run)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    return fig, fig.add_subplot()


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _timeline_chart(timeline: list) -> str:
    fig, ax = _figure(5, 2.8)
    xs, total, ys = [0.0], 0, [0]
    for t, n in timeline:
        total += n
        xs.append(t)
        ys.append(total)
    ax.step(xs, ys, where="post", color="#3465a4")
    ax.set(title="rows written over the run", xlabel="seconds since the first part", ylabel="rows")
    return _svg(fig)


def _histogram_chart(dist: dict[str, int]) -> str | None:
    if not dist:
        return None
    items = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_LABELS]
    fig, ax = _figure(5, max(2.8, 0.8 + 0.22 * len(items)))
    ax.barh(range(len(items)), [v for _, v in items][::-1], color="#4e9a06")
    ax.set_yticks(range(len(items)), [k for k, _ in items][::-1])  # positions: labels "0".."9" stay labels
    ax.set(title=f"top-1 labels ({len(dist)} distinct)", xlabel="rows")
    return _svg(fig)


def _confidence_chart(bins: list[int]) -> str | None:
    if not bins or not sum(bins):
        return None
    fig, ax = _figure(5, 2.8)
    width = 1 / len(bins)
    ax.bar([i * width for i in range(len(bins))], bins, width=width, align="edge", color="#75507b")
    ax.set(title="top-1 probability", xlabel="probability", ylabel="rows", xlim=(0, 1))
    return _svg(fig)


def _samples(output: str, manifest: dict) -> str:
    """A grid of thumbnails with their top labels: the first scored rows and a few errors,
    read from the part files one at a time (only the columns shown)."""
    e = html.escape
    scored, failed = [], []
    columns = ["id", "labels", "probs", "error", "error_code"]
    try:
        for table in committed.parts(output, manifest, columns):
            for row in table.to_pylist():
                if row["error"] is None and len(scored) < SAMPLES:
                    scored.append(row)
                elif row["error"] is not None and len(failed) < ERROR_SAMPLES:
                    failed.append(row)
            if len(scored) >= SAMPLES and len(failed) >= ERROR_SAMPLES:
                break
    except Exception as err:  # noqa: BLE001 - a schema without labels (embeddings only), an unreadable part
        return f"<section id='samples'><h2>Samples</h2><p>not shown: {e(str(err))}</p></section>"
    cells = []
    for row in scored + failed:
        thumb = _thumbnail(row["id"])
        img = (f"<img alt='{e(_short(row['id']))}' src='{thumb}'>" if thumb
               else "<div class='noimg'>no preview</div>")
        if row["error"] is None:
            text = "<br>".join(f"{e(lb)} <span class='p'>{p:.2f}</span>"
                               for lb, p in list(zip(row["labels"] or [], row["probs"] or []))[:3]) or "<i>no label</i>"
            cls = "cell"
        else:
            text = f"<span class='err'>{e(row['error_code'] or 'error')}</span>"
            cls = "cell bad"
        cells.append(f"<div class='{cls}'>{img}<div class='name'>{e(_short(row['id']))}</div>"
                     f"<div class='lab'>{text}</div></div>")
    return ("<section id='samples'><h2>Samples</h2><div class='grid'>" + "".join(cells) + "</div></section>")


def _short(id_: str) -> str:
    return id_.rsplit("/", 1)[-1][-40:]


def _thumbnail(id_: str) -> str | None:
    """A JPEG data URI of the image an image-file row came from; None for container rows or
    images that cannot be read."""
    if "#" in id_:
        return None
    try:
        fs, path = fsutil.resolve(id_)
        with fs.open(path, "rb") as f:
            data = f.read(64 * 2**20)
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMBNAIL * 2, THUMBNAIL * 2))
            img = img.convert("RGB")
            img.thumbnail((THUMBNAIL, THUMBNAIL))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a preview is optional; error rows often cannot be decoded
        return None


def _evaluation(ev: dict) -> str:
    e = html.escape
    unknown = ev.get("unknown", {})
    head = [f"<tr><th>labelled rows</th><td class='n'>{ev['labelled']}</td></tr>",
            f"<tr><th>evaluated</th><td class='n'>{ev['rows']}</td></tr>",
            f"<tr><th>unlabelled rows</th><td class='n'>{ev['unlabelled']}</td></tr>",
            f"<tr><th>labelled error rows</th><td class='n'>{ev['error_rows']}</td></tr>",
            f"<tr><th>labels not in the checkpoint</th><td class='n'>{unknown.get('rows', 0)} row(s)"
            + (": " + e(", ".join(f"{k} ({v})" for k, v in list(unknown.get("labels", {}).items())[:10]))
               if unknown.get("rows") else "") + "</td></tr>"]
    charts = []
    if ev["multi_label"]:
        head += [f"<tr><th>mean average precision</th><td class='n'>{_num(ev['mean_average_precision'])}</td></tr>",
                 f"<tr><th>micro P / R / F1</th><td class='n'>{_num(ev['micro']['precision'])} / "
                 f"{_num(ev['micro']['recall'])} / {_num(ev['micro']['f1'])}</td></tr>"]
        rows = ev["per_label"]
        table = "".join(f"<tr><td>{e(k)}</td><td class='n'>{_num(v['precision'])}</td><td class='n'>"
                        f"{_num(v['recall'])}</td><td class='n'>{_num(v['f1'])}</td><td class='n'>{v['support']}</td>"
                        f"<td class='n'>{_num(v['average_precision'])}</td></tr>"
                        for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["support"])[:50])
        detail = ("<table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
                  f"<th>AP</th></tr>{table}</table>")
    else:
        head += [f"<tr><th>top-1 accuracy</th><td class='n' id='accuracy'>{_num(ev['accuracy'], 4)}</td></tr>",
                 f"<tr><th>top-5 accuracy</th><td class='n'>{_num(ev['top5_accuracy'], 4)}</td></tr>",
                 f"<tr><th>expected calibration error</th><td class='n'>{_num(ev['ece'], 4)}</td></tr>",
                 f"<tr><th>macro P / R / F1</th><td class='n'>{_num(ev['macro']['precision'])} / "
                 f"{_num(ev['macro']['recall'])} / {_num(ev['macro']['f1'])}</td></tr>"]
        rows = ev["per_class"]
        table = "".join(f"<tr><td>{e(k)}</td><td class='n'>{_num(v['precision'])}</td><td class='n'>"
                        f"{_num(v['recall'])}</td><td class='n'>{_num(v['f1'])}</td><td class='n'>{v['support']}</td></tr>"
                        for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["support"])[:50])
        detail = ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
                  f"{table}</table>")
        charts.append(_confusion_chart(ev["confusion"]))
        charts.append(_reliability_chart(ev.get("ece_bins") or []))
    return ("<section id='evaluation'><h2>Evaluation against known labels</h2>"
            f"<p class='sub'>ground truth: {e(str(ev.get('source')))}</p><table class='kv'>{''.join(head)}</table>"
            "<div class='charts'>" + "".join(f"<figure>{c}</figure>" for c in charts if c) + "</div>"
            + detail + "</section>")


def _confusion_chart(confusion: dict) -> str | None:
    labels, counts = confusion["labels"], confusion["counts"]
    if not labels:
        return None
    if len(labels) > MATRIX_LABELS:
        pairs = sorted((c for c in counts if c[0] != c[1]), key=lambda c: -c[2])[:20]
        rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(p)}</td><td class='n'>{n}</td></tr>"
                       for t, p, n in pairs)
        return f"<table><tr><th>true</th><th>predicted</th><th>rows</th></tr>{rows}</table>"
    index = {lb: i for i, lb in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p, n in counts:
        if t in index and p in index:
            m[index[t], index[p]] += n
    size = 1.5 + 0.32 * len(labels)
    fig, ax = _figure(size + 1, size)
    im = ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(title="confusion matrix", xlabel="predicted", ylabel="true")
    if len(labels) <= 15:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > m.max() / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _svg(fig)


def _reliability_chart(bins: list) -> str | None:
    points = [(i, conf, acc, n) for i, (n, conf, acc) in enumerate(bins) if n]
    if not points:
        return None
    fig, ax = _figure(4, 3)
    width = 1 / len(bins)
    ax.bar([i * width for i, *_ in points], [acc for _, _, acc, _ in points], width=width, align="edge",
           color="#3465a4", edgecolor="white", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set(title="reliability (top-1)", xlabel="top-1 probability", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    return _svg(fig)


def _drift(found: dict | None) -> str:
    e = html.escape
    if not found:
        return ("<section id='drift'><h2>Drift</h2><p>no baseline: pass <code>--baseline OUTPUT</code> "
                "(nightly runs compare with the previous committed partition)</p></section>")
    rows = []
    for name, f in found["figures"].items():
        detail = (f"{_num(f['baseline'])} → {_num(f['current'])}" if "current" in f else "")
        flag = "<span class='flag'>FLAGGED</span>" if f["flagged"] else "ok"
        rows.append(f"<tr class='{'bad' if f['flagged'] else ''}'><td>{e(name)}</td><td class='n'>{_num(f['value'], 4)}"
                    f"</td><td>{detail}</td><td class='n'>{f['threshold']}</td><td>{flag}</td></tr>")
    table = ("<table id='drift-table'><tr><th>figure</th><th>value</th><th>baseline → this run</th><th>threshold</th>"
             f"<th></th></tr>{''.join(rows)}</table>")
    if found.get("model_changed"):
        models = found.get("models") or {}
        table = (f"<p class='flag' id='model-changed'>MODEL CHANGED: the baseline was scored with "
                 f"{e(str(models.get('baseline')))}, this run with {e(str(models.get('current')))}; the figures "
                 "below compare two models, not only two sets of data</p>" + table)
    labels = found["labels"][:TOP_LABELS]
    chart = None
    if labels:
        fig, ax = _figure(6, 0.6 + 0.3 * len(labels))
        y = np.arange(len(labels))[::-1]
        ax.barh(y + 0.2, [lb["baseline_share"] for lb in labels], height=0.4, label="baseline", color="#babdb6")
        ax.barh(y - 0.2, [lb["current_share"] for lb in labels], height=0.4, label="this run", color="#3465a4")
        ax.set_yticks(y, [lb["label"] for lb in labels])
        ax.set(title="top-1 label share", xlabel="share of scored rows")
        ax.legend(fontsize=7)
        chart = _svg(fig)
    share = "".join(f"<tr><td>{e(lb['label'])}</td><td class='n'>{lb['baseline']}</td><td class='n'>"
                    f"{100 * lb['baseline_share']:.1f}%</td><td class='n'>{lb['current']}</td><td class='n'>"
                    f"{100 * lb['current_share']:.1f}%</td></tr>" for lb in labels)
    return ("<section id='drift'><h2>Drift against the baseline</h2>"
            f"<p class='sub'>baseline {e(found['baseline'])} (run {e(found['baseline_run_id'])})</p>{table}"
            + (f"<div class='charts'><figure>{chart}</figure></div>" if chart else "")
            + "<table><tr><th>label</th><th>baseline rows</th><th>share</th><th>this run</th><th>share</th></tr>"
            + share + "</table></section>")


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }}
h1 {{ font-size: 22px; margin-bottom: 2px; }} h2 {{ font-size: 18px; border-bottom: 1px solid #ddd; }}
.sub {{ color: #666; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; }}
figure svg {{ max-width: 100%; height: auto; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); gap: 10px; }}
.cell {{ border: 1px solid #ddd; border-radius: 6px; padding: 6px; font-size: 12px; }}
.cell.bad {{ border-color: #cc0000; background: #fff4f4; }}
.cell img, .noimg {{ display: block; width: {thumb}px; height: {thumb}px; object-fit: contain; margin: 0 auto;
  background: #f4f4f4; }}
.noimg {{ line-height: {thumb}px; text-align: center; color: #999; }}
.name {{ color: #666; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }}
.p {{ color: #888; }} .err {{ color: #cc0000; font-weight: bold; }}
tr.bad td {{ background: #fff4f4; }} .flag {{ color: #cc0000; font-weight: bold; }}
</style></head>
<body>
{body}
<footer class="sub">written by batchscore; self-contained (no network)</footer>
</body></html>
""".replace("{thumb}", str(THUMBNAIL))
