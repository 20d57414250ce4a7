"""The report's open-set section: the new-individual threshold `jaguar calibrate` chose on
validation, its figures (known / unknown accuracy, balanced accuracy, geometric mean, per-fold
spread) and the accuracy-vs-threshold curve, and with local pattern evidence the fusion weight and
the balanced accuracy at each weight tried; read from the run, never recomputed."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

import numpy as np

from jaguar.errors import JaguarError
from jaguar.report import plots
from jaguar.retrieval.openset.calibrate import uninformative
from jaguar.run import RunDir


def open_set_section(run: RunDir, figure: Callable[[str], Path], img: Callable[[Path, str], str]) -> str:
    """HTML of the section; a note naming `jaguar calibrate` when the run has no calibration."""
    parts = ["<h2>Open-set identification</h2>"]
    if not run.has_calibration():
        parts.append(f'<div class="missing">No new-individual calibration ({html.escape(run.calibration_path.name)}) '
                     f"— produce it with <code>jaguar calibrate {html.escape(str(run))}</code>.</div>")
        return "\n".join(parts)
    try:
        calibration = run.load_calibration()
    except (JaguarError, OSError) as err:
        return "\n".join(parts + [f'<div class="missing">{html.escape(str(err))}</div>'])
    spread = float(np.std(calibration.fold_balanced)) if calibration.fold_balanced else float("nan")
    fused = calibration.local_evidence and calibration.fusion is not None
    score = (f"fused probability P(same individual) (cosine weight {calibration.fusion['weight']:.1f}, verified "
             f"keypoint inliers against the top {calibration.local_shortlist})" if fused else "score")
    rows = [("threshold", f"{calibration.figures.threshold:.4f} on the {calibration.aggregate} {score}"),
            ("known accuracy", f"{calibration.figures.known_accuracy:.4f} ({calibration.figures.num_known} known queries)"),
            ("unknown accuracy", f"{calibration.figures.unknown_accuracy:.4f} ({calibration.figures.num_unknown} unknown queries)"),
            ("balanced accuracy", f"{calibration.figures.balanced_accuracy:.4f} (+- {spread:.4f} over {calibration.folds} folds)"),
            ("geometric mean (AnimalCLEF)", f"{calibration.figures.geometric_mean:.4f}"),
            ("known rank-1", f"{calibration.figures.known_rank1:.4f}"),
            ("hold-outs", calibration.held_out_groups)]
    if fused:  # the cross-fitted balanced accuracy at each weight; 1.0: the calibrated cosine alone
        rows.append(("balanced accuracy by cosine weight", ", ".join(
            f"{weight}: {value:.4f}" for weight, value in sorted(calibration.fusion_weights.items()))))
    parts.append("<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
                 + "</table>")
    warning = uninformative(calibration)
    if warning:
        parts.append(f'<div class="missing">{html.escape(warning)}</div>')
    aggregates = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
        f"<td class='num'>{values.get(key, float('nan')):.4f}</td>"
        for key in ("threshold", "balanced_accuracy", "geometric_mean", "known_rank1")) + "</tr>"
        for name, values in calibration.aggregates.items())
    parts.append("<p class='sub'>Per-individual score aggregates tried on validation (the best balanced "
                 "accuracy is kept):</p><table><tr><th>aggregate</th><th>threshold</th><th>balanced accuracy</th>"
                 f"<th>geometric mean</th><th>known rank-1</th></tr>{aggregates}</table>")
    if calibration.curve.get("threshold"):
        path = plots.plot_open_set_curve(calibration.curve, calibration.figures.threshold, figure("open_set_curve.png"),
                                         "validation, identities held out as unseen")
        parts.append(img(path, "open-set accuracy against the threshold"))
    return "\n".join(parts)
