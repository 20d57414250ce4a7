"""The run report: one self-contained HTML page (index.html in the run's report folder) with its
PNG figures, built from whatever the run folder holds, read through RunDir. The report only reads
the run: every figure in its tables is an artifact of the stage that owns it (tune-post's table,
score's test table); a missing or malformed input becomes a note naming the command that produces
it, never a crash."""

from __future__ import annotations

import datetime
import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from jaguar.config import Config, RetrievalConfig, get_value
from jaguar.errors import JaguarError
from jaguar.io import atomic_write_text
from jaguar.report import plots
from jaguar.report.grids import find_shards, grid_rows, match_pictures
from jaguar.report.diagnosis import diagnosis_section
from jaguar.report.openset import open_set_section
from jaguar.report.tb_reader import read_scalars
from jaguar.core.features import FeatureSet
from jaguar.retrieval.score import labelled_test_features
from jaguar.retrieval.split_figures import SplitFigures, run_split_figures
from jaguar.run import EnsembleRecord, PostResult, RunDir, Score, ScoreTable, TrainingMetrics

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


T = TypeVar("T")


def _read(load: Callable[[], T], exists: bool) -> tuple[Optional[T], str]:
    """(artifact, problem): an absent artifact is (None, ""); a malformed one is reported in the
    page instead of stopping it."""
    if not exists:
        return None, ""
    try:
        return load(), ""
    except (JaguarError, OSError) as err:
        return None, str(err)


@dataclass
class _Page:
    run: RunDir
    out_dir: Path
    sections: list[str]

    def figure(self, name: str) -> Path:
        return self.out_dir / name

    def img(self, path: Path | None, alt: str) -> str:
        if path is None or not Path(path).is_file():
            return ""
        return f'<img src="{_esc(Path(path).relative_to(self.out_dir).as_posix())}" alt="{_esc(alt)}">'


def _extraction_text(retrieval: Optional[RetrievalConfig]) -> str:
    """How the run's features were embedded, as the config says (flip TTA, scales)."""
    if retrieval is None:
        return "the run's extraction settings (config unreadable)"
    flip = "flip TTA" if retrieval.flip_tta else "no flip TTA"
    scales = list(retrieval.scales)
    return flip + ("" if scales == [1.0] else f", scales {', '.join(f'{scale:g}' for scale in scales)}")


def _summary_section(page: _Page, post: Optional[PostResult], post_problem: str,
                     metrics: Optional[TrainingMetrics], score: Optional[Score],
                     score_table: Optional[ScoreTable], is_ensemble: bool,
                     retrieval: Optional[RetrievalConfig]) -> str:
    run = page.run
    extraction = _extraction_text(retrieval)
    parts = ["<h2>Results</h2>", '<div class="cards">']
    if metrics is not None and metrics.best:
        best = metrics.best
        flip = "" if retrieval is None else (", flip TTA" if retrieval.flip_tta else ", no flip TTA")
        parts.append(f'<div class="card"><div class="v">{_fmt(best.get("mAP_balanced"))}</div>'
                     f'<div class="k">validation during training, best epoch ({_esc(best.get("epoch"))}):<br>'
                     f'identity-balanced mAP, cosine{flip}, no post-processing ({_esc(run.metrics_path.name)})'
                     '</div></div>')
    if score is not None:
        last = score_table.table[-1] if score_table is not None and score_table.table else None
        scored = last.config.describe() + last.fusion_text() if last is not None else None
        how = f"the submission ({scored})" if scored else "the submission"
        parts.append(f'<div class="card"><div class="v">{_fmt(score.mAP_balanced)}</div>'
                     f'<div class="k">test, identity-balanced mAP of {_esc(how)}<br>'
                     f'extracted features, {_esc(extraction)} ({_esc(run.score_path.name)})</div></div>')
    parts.append("</div>")
    if metrics is None and not is_ensemble:
        parts.append(_missing(f"No training metrics ({run.metrics_path})", f"jaguar train RECIPE run.dir={run}"))
    if score is None:
        parts.append(_missing(f"No local test score ({run.score_path.name})",
                              f"jaguar score {run} --test-csv TEST_CSV --labels LABELS_CSV"))

    test_rows = score_table.table if score_table is not None else None
    if post is not None and post.table:
        test_by_name = {row.name: row for row in (test_rows or [])}
        header = ("<tr><th>post-processing</th><th>val mAP (balanced)</th><th>val mAP</th><th>val rank-1</th>"
                  "<th>val rank-5</th><th>val mINP</th>")
        decided = any(row.adopted is not None for row in post.table)
        if decided:
            header += "<th>adopted<br><span class='sub'>val gain +- SE over identities</span></th>"
        if test_rows is not None:
            header += (f"<th>test mAP (balanced)<br><span class='sub'>{_esc(run.score_table_path.name)}, "
                       f"labels {_esc(score_table.labels)}</span></th>")
        rows = [header + "</tr>"]
        for row in post.table:
            css = ' class="chosen"' if row.is_chosen else ""
            cells = f"<td>{_esc(row.label())}</td>" + "".join(
                f"<td class='num'>{_fmt(value)}</td>" for value in (row.mAP_balanced, row.mAP, row.rank1, row.rank5,
                                                                     row.mINP))
            if decided:
                cells += f"<td>{_esc(row.decision_text())}</td>"
            if test_rows is not None:
                test_row = test_by_name.get(row.name)
                cells += f"<td class='num'>{_fmt(test_row.mAP_balanced if test_row else None)}</td>"
            rows.append(f"<tr{css}>{cells}</tr>")
        active = post.chosen.active()
        settings = f" <code>{_esc(json.dumps(active))}</code>" if active else ""
        parts.append(f"<p class='sub'>Each row: identity-balanced mAP and the other figures of the extracted "
                     f"features ({_esc(run.features_dir.name)}/, {_esc(extraction)}) after that row's "
                     f"post-processing, on the {_esc(post.val_size)} validation images"
                     + (" and on the labelled test images" if test_rows is not None else "")
                     + ". The raw row comes from the extracted features, an embedding pass of its own, not "
                     "from the validation training ran at each epoch (the card above); where the two differ, the "
                     "extracted features are what tune-post, submit and identify use. "
                     f"Chosen settings: {_esc(post.chosen.describe() + post.table[-1].fusion_text())}{settings}</p>")
        parts.append("<table>" + "".join(rows) + "</table>")
    else:
        parts.append(_missing(post_problem or f"No post-processing table ({run.post_path})",
                              f"jaguar tune-post {run}"))
    if test_rows is None:
        parts.append(f"<p class='sub'>Test-side scores appear when the test labels are known: "
                     f"<code>jaguar score {_esc(run)} --test-csv TEST_CSV --labels LABELS_CSV</code> "
                     f"writes them to {_esc(run.score_table_path.name)}.</p>")
    return "\n".join(parts)


_CONFIG_KEYS = (
    ("backbone", "model.backbone"), ("image size", "model.img_size"), ("pooling", "model.pooling"),
    ("head", "model.head"), ("epochs", "train.epochs"), ("precision", "train.precision"),
    ("optimizer", "optim.name"), ("learning rate", "optim.lr"), ("scheduler", "optim.scheduler"),
    ("CE weight", "loss.ce_weight"), ("label smoothing", "loss.label_smoothing"),
    ("triplet weight", "loss.triplet_weight"), ("center weight", "loss.center_weight"),
    ("sampler", "data.sampler"), ("alpha", "data.alpha_mode"), ("shards", "data.shards"),
)


def _config_section(page: _Page, config: Optional[Config], problem: str) -> str:
    parts = ["<h2>Configuration</h2>"]
    if problem:  # the file is there but wrong: it is fixed, not re-made by training
        parts.append(f'<div class="missing">{_esc(problem)} — correct it in <code>{_esc(page.run.config_path)}'
                     f'</code>; meanwhile this page uses the default retrieval settings.</div>')
        return "\n".join(parts)
    if config is None:
        parts.append(_missing(f"No resolved config ({page.run.config_path})",
                              f"jaguar train RECIPE run.dir={page.run}"))
        return "\n".join(parts)
    rows = "".join(f"<tr><th>{_esc(label)}</th><td><code>{_esc(get_value(config, key))}</code></td></tr>"
                   for label, key in _CONFIG_KEYS)
    parts.append(f"<table>{rows}</table><p class='sub'>Full config: <code>{_esc(page.run.config_path.name)}"
                 f"</code> in the run folder.</p>")
    return "\n".join(parts)


def _curves_section(page: _Page, is_ensemble: bool) -> str:
    parts = ["<h2>Training curves</h2>"]
    tb_dir = page.run.tb_dir
    try:
        scalars = read_scalars(tb_dir)
    except FileNotFoundError:
        scalars = {}
    figure = plots.plot_training_curves(scalars, page.figure("training_curves.png")) if scalars else None
    if figure is None and is_ensemble:
        parts.append("<p class='sub'>An ensemble has no training of its own: see its members' reports.</p>")
    elif figure is None:
        parts.append(_missing(f"No TensorBoard scalars in {tb_dir}", f"jaguar train RECIPE run.dir={page.run}"))
    else:
        parts.append(page.img(figure, "training curves"))
        parts.append(f"<p class='sub'>{len(scalars)} scalar tags from <code>{_esc(tb_dir.name)}/</code>.</p>")
    return "\n".join(parts)


def _evaluation_sections(page: _Page, evaluation: SplitFigures, shards: Any, shards_problem: str,
                         notes: list[tuple[str, str]], extraction: str) -> str:
    split = evaluation.split
    parts = [f"<h2>Per-identity AP — {_esc(split)}</h2>",
             f"<p class='sub'>{len(evaluation.features):,} images, extracted features ({_esc(extraction)}), "
             f"scored with {_esc(evaluation.scored_with)}; "
             f"{_esc(evaluation.figures_text)}</p>"]
    parts.extend(_missing(note, command) for note, command in notes)
    chart = plots.plot_per_identity_ap(evaluation.ap_by_identity, page.figure(f"per_identity_ap_{split}.png"),
                                       f"Per-identity {evaluation.ap_name} ({split})",
                                       evaluation.ap_upper_by_identity)
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
        pictures = match_pictures(evaluation, shards, which, GRID_QUERIES, GRID_TOP_K)
        if pictures:
            figure = plots.stack_pictures(pictures, page.figure(f"matches_{which}_{split}.png"))
            parts.append(f"<p class='sub'>Pattern evidence of these {which} queries: the verified correspondences "
                         f"(<code>jaguar match</code>, {_esc(page.run.local_matches_path(split).name)} in "
                         f"{_esc(page.run.local_dir.name)}/) between each query and its top candidates (one row a "
                         f"query, in the order of the grid above), a line between each pair of matched spots. Same "
                         f"rosettes joined by many parallel lines confirm a match by eye.</p>")
            parts.append(page.img(figure, f"verified correspondences, {which} queries {split}"))

    parts.append(f"<h2>Similarity distributions — {_esc(split)}</h2>")
    histogram = plots.plot_similarity_histograms(evaluation.cosine_sample, evaluation.sample_labels,
                                                 page.figure(f"similarity_{split}.png"),
                                                 f"Pair similarities ({split})")
    parts.append(page.img(histogram, f"similarity distributions {split}"))
    if len(evaluation.sample_labels) < len(evaluation.labels):
        parts.append(f"<p class='sub'>From a random sample of {len(evaluation.sample_labels):,} of the "
                     f"{len(evaluation.labels):,} images.</p>")
    parts.append("<p class='sub'>Raw cosine similarity of ordered pairs; the less the two overlap, "
                 "the better a single threshold separates same from different identities.</p>")
    return "\n".join(parts)


def _ensemble_section(ensemble: EnsembleRecord) -> str:
    rows = "".join(f"<tr><td><code>{_esc(member)}</code></td><td class='num'>{_fmt(weight)}</td></tr>"
                   for member, weight in zip(ensemble.members, ensemble.weights))
    modes = sorted({str(s.get("mode")) for s in ensemble.splits.values() if isinstance(s, dict)})
    return ("<h2>Ensemble</h2><p class='sub'>Features combined by "
            f"<b>{_esc(', '.join(modes) or ensemble.mode)}</b> (see jaguar/ensemble.py); the "
            "configuration below is the first member's.</p>"
            f"<table><tr><th>member run</th><th>weight</th></tr>{rows}</table>")


def build_report(run_dir: str | Path | RunDir, test_labels: str | Path | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Write RUN/report/index.html and its figures from what the run holds; return the page's path.
    The report reads the run and writes only under its own folder. `test_labels` (filename,
    ground_truth) labels the test features for the test-side figures."""
    run = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).require()
    out_dir = Path(out_dir) if out_dir else run.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):  # figures of a section that is now missing must not linger
        stale.unlink()
    page = _Page(run, out_dir, [])

    config, config_problem = _read(run.load_config, run.has_config())
    post, post_problem = _read(run.load_post, run.has_post())
    metrics, _ = _read(run.load_metrics, run.has_metrics())
    score, _ = _read(run.load_score, run.has_score())
    score_table, _ = _read(run.load_score_table, run.has_score_table())
    ensemble, _ = _read(run.load_ensemble, run.is_ensemble())
    chosen = post.chosen if post is not None else None
    retrieval = config.retrieval if config is not None else None
    for problem in (config_problem, post_problem):
        if problem:  # the page shows it too; a redirected log should not hide it
            logger.warning("%s", problem)
    if config_problem:
        shards, shards_problem = None, (f"{run.config_path.name} could not be read, so its shards folder "
                                        f"(data.shards) is unknown and no pictures can be shown")
    else:
        shards, shards_problem = find_shards(run.path, config.data.shards if config is not None else "")

    evaluations: list[tuple[SplitFigures, list[tuple[str, str]]]] = []
    eval_notes: list[str] = []

    def add(split: str, features: FeatureSet) -> None:
        evaluations.append(run_split_figures(run, split, features, chosen, retrieval, post is not None, post))

    if run.has_features("val"):
        add("val", run.load_features("val"))
    else:
        eval_notes.append(_missing(f"No validation features ({run.features_path('val')})",
                                   f"jaguar extract {run} --split val"))
    if run.has_features("test"):
        labelled_test = labelled_test_features(run, test_labels)
        if labelled_test is not None:
            add("test", labelled_test)
    elif test_labels:
        eval_notes.append(_missing(f"--test-labels given but no test features ({run.features_path('test')})",
                                   f"jaguar extract {run} --split test"))

    if ensemble is not None:
        page.sections.append(_ensemble_section(ensemble))
    page.sections.append(_summary_section(page, post, post_problem, metrics, score, score_table,
                                          ensemble is not None, retrieval))
    page.sections.append(_config_section(page, config, config_problem))
    page.sections.append(open_set_section(run, page.figure, page.img))
    page.sections.append(diagnosis_section(run, page.figure, page.img))
    page.sections.append(_curves_section(page, ensemble is not None))
    page.sections.extend(eval_notes)
    for evaluation, notes in evaluations:
        page.sections.append(_evaluation_sections(page, evaluation, shards, shards_problem, notes,
                                                  _extraction_text(retrieval)))

    name = run.path.resolve().name
    title = name if ensemble is not None or config is None else (config.run.name or name)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    document = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>jaguar report — {_esc(title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>jaguar run report: {_esc(title)}</h1>"
                f"<div class='sub'>{_esc(run.path.resolve())} · generated {now}</div>\n"
                + "\n".join(page.sections) + "\n</body></html>\n")
    index = out_dir / "index.html"
    atomic_write_text(index, document)
    logger.info("report written to %s", index)
    return index
