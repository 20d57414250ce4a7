"""The run report: one self-contained HTML page (RUN/report/index.html) with its PNG figures,
built from whatever the run folder holds; a missing input becomes a note naming the command
that produces it, never a crash."""

from __future__ import annotations

import datetime
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jaguar.io import atomic_write_json, atomic_write_text
from jaguar.report import plots
from jaguar.report.evaluation import (Evaluation, evaluate, find_shards, grid_rows, load_labelled_test,
                                      test_score_table)
from jaguar.retrieval.features import FeatureSet
from jaguar.retrieval.postprocess import decision_text

logger = logging.getLogger(__name__)

GRID_QUERIES = 4  # best and worst queries shown per split
GRID_TOP_K = 5

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1150px;
color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;font-size:13px} table{border-collapse:collapse;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:left;font-size:14px} th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums} tr.chosen td{font-weight:bold;background:#eef7ee}
.missing{background:#fff6e0;border-left:4px solid #f0ad4e;padding:8px 12px;margin:8px 0;font-size:14px}
img{max-width:100%;border:1px solid #eee;margin:6px 0} code{background:#f3f3f3;padding:1px 4px}
.cards{display:flex;gap:12px;flex-wrap:wrap} .card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card .v{font-size:22px;font-weight:bold} .card .k{font-size:12px;color:#666}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _missing(what: str, command: str) -> str:
    return f'<div class="missing">{_esc(what)} — produce it with <code>{_esc(command)}</code>.</div>'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else _esc(value)


def _read_json(path: Path) -> tuple[Any, str]:
    """(content, problem): a malformed file is reported in the page instead of stopping it."""
    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text()), ""
    except (OSError, json.JSONDecodeError) as err:
        return None, f"{path} could not be read ({err})"


def _read_config(run_dir: Path) -> tuple[dict, str]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}, ""
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
        return (mapping, "") if isinstance(mapping, dict) else ({}, f"{path} is not a mapping")
    except yaml.YAMLError as err:
        return {}, f"{path} is not valid YAML ({err})"


def _get(config: dict, dotted: str) -> Any:
    group, key = dotted.split(".")
    return (config.get(group) or {}).get(key)


@dataclass
class _Page:
    run_dir: Path
    out_dir: Path
    sections: list[str]

    def figure(self, name: str) -> Path:
        return self.out_dir / name

    def img(self, path: Path | None, alt: str) -> str:
        if path is None or not Path(path).is_file():
            return ""
        return f'<img src="{_esc(Path(path).relative_to(self.out_dir).as_posix())}" alt="{_esc(alt)}">'


def _summary_section(page: _Page, post: Any, post_problem: str, metrics: Any, score: Any,
                     score_table: Any, computed_test: list[dict] | None) -> str:
    run = page.run_dir
    parts = ["<h2>Results</h2>", '<div class="cards">']
    if isinstance(metrics, dict) and isinstance(metrics.get("best"), dict):
        best = metrics["best"]
        parts.append(f'<div class="card"><div class="v">{_fmt(best.get("mAP_balanced"))}</div>'
                     f'<div class="k">best validation mAP (epoch {_esc(best.get("epoch"))})</div></div>')
    if isinstance(score, dict) and "mAP_balanced" in score:
        parts.append(f'<div class="card"><div class="v">{_fmt(score["mAP_balanced"])}</div>'
                     f'<div class="k">local test score (score.json)</div></div>')
    parts.append("</div>")
    if not isinstance(metrics, dict) and not (run / "ensemble.json").is_file():
        parts.append(_missing(f"No training metrics ({run / 'metrics.json'})", "jaguar train RECIPE run.dir=" + str(run)))
    if score is None:
        parts.append(_missing("No local test score (score.json)",
                              f"jaguar score {run / 'submission.csv'} --test-csv TEST_CSV --labels LABELS_CSV "
                              f"--json {run / 'score.json'}"))

    table = post.get("table") if isinstance(post, dict) else None
    test_rows: list[dict] | None = None
    test_source = ""
    if computed_test is not None:
        test_rows, test_source = computed_test, "computed from --test-labels"
    elif isinstance(score_table, dict) and isinstance(score_table.get("table"), list):
        test_rows, test_source = score_table["table"], "score_table.json"
    if isinstance(table, list) and table:
        test_by_name = {row.get("name"): row for row in (test_rows or []) if isinstance(row, dict)}
        header = "<tr><th>post-processing</th><th>val mAP (balanced)</th><th>val rank-1</th>"
        decided = any("adopted" in row for row in table if isinstance(row, dict))
        if decided:
            header += "<th>adopted<br><span class='sub'>val gain +- SE over identities</span></th>"
        if test_rows is not None:
            header += f"<th>test mAP (balanced)<br><span class='sub'>{_esc(test_source)}</span></th>"
        rows = [header + "</tr>"]
        for row in table:
            name = row.get("name", "?")
            css = ' class="chosen"' if "chosen" in str(name) else ""
            cells = (f"<td>{_esc(name)}</td><td class='num'>{_fmt(row.get('mAP_balanced'))}</td>"
                     f"<td class='num'>{_fmt(row.get('rank1'))}</td>")
            if decided:
                cells += f"<td>{_esc(decision_text(row))}</td>"
            if test_rows is not None:
                cells += f"<td class='num'>{_fmt((test_by_name.get(name) or {}).get('mAP_balanced'))}</td>"
            rows.append(f"<tr{css}>{cells}</tr>")
        parts.append(f"<p class='sub'>Validation: {_esc(post.get('val_size', '?'))} images. "
                     f"Chosen settings: <code>{_esc(json.dumps(post.get('chosen', {})))}</code></p>")
        parts.append("<table>" + "".join(rows) + "</table>")
    else:
        parts.append(_missing(post_problem or f"No post-processing table ({run / 'post.json'})",
                              f"jaguar tune-post {run}"))
    if test_rows is None:
        parts.append("<p class='sub'>Test-side scores appear when the test labels are known "
                     "(score_table.json, or <code>jaguar report RUN --test-labels CSV</code>).</p>")
    return "\n".join(parts)


_CONFIG_KEYS = (
    ("backbone", "model.backbone"), ("image size", "model.img_size"), ("pooling", "model.pooling"),
    ("head", "model.head"), ("epochs", "train.epochs"), ("precision", "train.precision"),
    ("optimizer", "optim.name"), ("learning rate", "optim.lr"), ("scheduler", "optim.scheduler"),
    ("CE weight", "loss.ce_weight"), ("label smoothing", "loss.label_smoothing"),
    ("triplet weight", "loss.triplet_weight"), ("center weight", "loss.center_weight"),
    ("sampler", "data.sampler"), ("alpha", "data.alpha_mode"), ("shards", "data.shards"),
)


def _config_section(page: _Page, config: dict, problem: str) -> str:
    parts = ["<h2>Configuration</h2>"]
    if not config:
        parts.append(_missing(problem or f"No resolved config ({page.run_dir / 'config.yaml'})",
                              "jaguar train RECIPE run.dir=" + str(page.run_dir)))
        return "\n".join(parts)
    rows = "".join(f"<tr><th>{_esc(label)}</th><td><code>{_esc(_get(config, key))}</code></td></tr>"
                   for label, key in _CONFIG_KEYS if _get(config, key) is not None)
    parts.append(f"<table>{rows}</table><p class='sub'>Full config: <code>config.yaml</code> in the run folder.</p>")
    return "\n".join(parts)


def _curves_section(page: _Page) -> str:
    from jaguar.report.tb_reader import read_scalars

    parts = ["<h2>Training curves</h2>"]
    tb_dir = page.run_dir / "tb"
    try:
        scalars = read_scalars(tb_dir)
    except FileNotFoundError:
        scalars = {}
    figure = plots.plot_training_curves(scalars, page.figure("training_curves.png")) if scalars else None
    if figure is None and (page.run_dir / "ensemble.json").is_file():
        parts.append("<p class='sub'>An ensemble has no training of its own: see its members' reports.</p>")
    elif figure is None:
        parts.append(_missing(f"No TensorBoard scalars in {tb_dir}", "jaguar train RECIPE run.dir=" + str(page.run_dir)))
    else:
        parts.append(page.img(figure, "training curves"))
        parts.append(f"<p class='sub'>{len(scalars)} scalar tags from <code>tb/</code>.</p>")
    return "\n".join(parts)


def _evaluation_sections(page: _Page, evaluation: Evaluation, shards: Any, shards_problem: str) -> str:
    split = evaluation.split
    parts = [f"<h2>Per-identity AP — {_esc(split)}</h2>",
             f"<p class='sub'>{len(evaluation.features)} images, scored with {_esc(evaluation.scored_with)}; "
             f"identity-balanced mAP {evaluation.balanced_map:.4f}.</p>"]
    chart = plots.plot_per_identity_ap(evaluation.ap_by_identity, page.figure(f"per_identity_ap_{split}.png"),
                                       f"Per-identity AP ({split})")
    parts.append(page.img(chart, f"per-identity AP {split}"))

    parts.append(f"<h2>Retrieval examples — {_esc(split)}</h2>")
    if shards_problem:
        parts.append(_missing(shards_problem, "jaguar prep ... (then set data.shards in the run config)"))
    for which in ("best", "worst"):
        rows = grid_rows(evaluation, shards, which, GRID_QUERIES, GRID_TOP_K)
        if not rows:
            continue
        grid = plots.render_retrieval_grid(rows, page.figure(f"retrieval_{which}_{split}.png"),
                                           f"{which.capitalize()} {len(rows)} queries ({split}): "
                                           f"top-{GRID_TOP_K}, green = same identity, red = different")
        parts.append(page.img(grid, f"{which} queries {split}"))

    parts.append(f"<h2>Similarity distributions — {_esc(split)}</h2>")
    histogram = plots.plot_similarity_histograms(evaluation.cosine, evaluation.labels,
                                                 page.figure(f"similarity_{split}.png"),
                                                 f"Pair similarities ({split})")
    parts.append(page.img(histogram, f"similarity distributions {split}"))
    parts.append("<p class='sub'>Raw cosine similarity of ordered pairs; the less the two overlap, "
                 "the better a single threshold separates same from different identities.</p>")
    return "\n".join(parts)


def _ensemble_section(ensemble: dict) -> str:
    members = ensemble.get("members") or []
    weights = ensemble.get("weights") or []
    rows = "".join(f"<tr><td><code>{_esc(member)}</code></td><td class='num'>{_fmt(weight)}</td></tr>"
                   for member, weight in zip(members, weights))
    modes = sorted({str(s.get("mode")) for s in (ensemble.get("splits") or {}).values() if isinstance(s, dict)})
    return ("<h2>Ensemble</h2><p class='sub'>Features combined by "
            f"<b>{_esc(', '.join(modes) or ensemble.get('mode', '?'))}</b> (see jaguar/ensemble.py); the "
            "configuration below is the first member's.</p>"
            f"<table><tr><th>member run</th><th>weight</th></tr>{rows}</table>")


def build_report(run_dir: str | Path, test_labels: str | Path | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Write RUN/report/index.html and its figures; return the page's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; give a `jaguar train` run.dir")
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):  # figures of a section that is now missing must not linger
        stale.unlink()
    page = _Page(run_dir, out_dir, [])

    config, config_problem = _read_config(run_dir)
    post, post_problem = _read_json(run_dir / "post.json")
    metrics, _ = _read_json(run_dir / "metrics.json")
    score, _ = _read_json(run_dir / "score.json")
    score_table, _ = _read_json(run_dir / "score_table.json")
    chosen = post.get("chosen") if isinstance(post, dict) else None
    shards, shards_problem = find_shards(run_dir, _get(config, "data.shards") or "")

    evaluations: list[Evaluation] = []
    eval_notes: list[str] = []
    val_path = run_dir / "features" / "val.safetensors"
    if val_path.is_file():
        evaluations.append(evaluate("val", FeatureSet.load(val_path), chosen))
    else:
        eval_notes.append(_missing(f"No validation features ({val_path})", f"jaguar extract {run_dir}"))
    computed_test = None
    test_path = run_dir / "features" / "test.safetensors"
    if test_path.is_file():
        labelled_test = load_labelled_test(test_path, test_labels)
        if labelled_test is not None:
            test_eval = evaluate("test", labelled_test, chosen)
            evaluations.append(test_eval)
            if chosen is not None:
                # Recomputed whenever labels are given, so a re-extracted run never shows stale scores.
                computed_test = test_score_table(labelled_test, post)
                score_table = {"table": computed_test, "labels": str(test_labels)}
                atomic_write_json(run_dir / "score_table.json", score_table)
    elif test_labels:
        eval_notes.append(_missing(f"--test-labels given but no test features ({test_path})",
                                   f"jaguar extract {run_dir}"))

    ensemble, _ = _read_json(run_dir / "ensemble.json")
    if isinstance(ensemble, dict):
        page.sections.append(_ensemble_section(ensemble))
    page.sections.append(_summary_section(page, post, post_problem, metrics, score, score_table, computed_test))
    page.sections.append(_config_section(page, config, config_problem))
    page.sections.append(_curves_section(page))
    page.sections.extend(eval_notes)
    for evaluation in evaluations:
        page.sections.append(_evaluation_sections(page, evaluation, shards, shards_problem))

    title = run_dir.resolve().name if isinstance(ensemble, dict) else (_get(config, "run.name")
                                                                       or run_dir.resolve().name)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    document = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>jaguar report — {_esc(title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>jaguar run report: {_esc(title)}</h1>"
                f"<div class='sub'>{_esc(run_dir.resolve())} · generated {now}</div>\n"
                + "\n".join(page.sections) + "\n</body></html>\n")
    index = out_dir / "index.html"
    atomic_write_text(index, document)
    logger.info("report written to %s", index)
    return index
