"""The report's shortcut-diagnostics section: what `jaguar diagnose` wrote for each split (context
rows beside chance, the context ratio, mirror self-similarity with its histogram, same- vs
cross-flank retrieval); read from the run, never recomputed."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Optional

from jaguar.errors import JaguarError
from jaguar.report import plots
from jaguar.run import Diagnosis, RunDir
from jaguar.run_records import DiagnosisRow

_EXPLAIN = ("Identity-balanced mAP of the split searched against itself (raw cosine, no QE or re-ranking), "
            "with the expected score of a random ranking beside it. <b>Foreground only</b>: the background "
            "replaced by a flat fill; <b>background only</b>: the animal removed by its mask and inpainted "
            "(OpenCV), no animal pixel left, an empty mask (the run's alpha handling then shows or hides the "
            "scene as it would for a photo without an animal); <b>silhouette only</b>: the mask filled flat. A model that "
            "recognises the coat scores near its original figure on foreground only and near chance on "
            "background and silhouette only; a high background-only figure is a background shortcut "
            "(the animals' camera sites), which will not carry over to a new site.")


def _cell(value: Optional[float]) -> str:
    return "<td class='num'>—</td>" if value is None else f"<td class='num'>{value:.4f}</td>"


def _rows_table(rows: list[DiagnosisRow]) -> str:
    notes = any(row.note for row in rows)
    body = "".join(f"<tr><td>{html.escape(row.name)}</td>{_cell(row.mAP_balanced)}{_cell(row.chance)}"
                   f"<td class='num'>{row.num_queries}</td>"
                   + (f"<td>{html.escape(row.note)}</td>" if notes else "") + "</tr>" for row in rows)
    return ("<table><tr><th>images</th><th>mAP (balanced)</th><th>chance</th><th>queries</th>"
            + ("<th>note</th>" if notes else "") + f"</tr>{body}</table>")


def _split_part(diagnosis: Diagnosis, figure: Callable[[str], Path], img: Callable[[Path, str], str]) -> str:
    split = diagnosis.split
    parts = [f"<h3>{html.escape(split)}: {diagnosis.images} images of {diagnosis.identities} identities</h3>",
             f"<p class='sub'>Weights {html.escape(diagnosis.features)}; flip TTA "
             f"{'on' if diagnosis.flip_tta else 'off'} (as the run extracts).</p>",
             _rows_table(diagnosis.context)]
    ratio = "—" if diagnosis.context_ratio is None else f"{diagnosis.context_ratio:.3f}"
    above = "—" if diagnosis.context_ratio_above_chance is None else f"{diagnosis.context_ratio_above_chance:.3f}"
    parts.append(f"<p>Context ratio background / foreground: <b>{ratio}</b> (each above its chance: {above}).</p>")
    mirror = diagnosis.mirror
    parts.append(f"<p>Mirror self-similarity (cosine between an image's embedding and its mirror image's, "
                 f"without flip TTA): median <b>{mirror.median:.3f}</b>, 10-90% {mirror.p10:.3f}-{mirror.p90:.3f}; "
                 f"for scale, images of the same identity {mirror.same_identity_mean:.3f}, of other identities "
                 f"{mirror.other_identity_mean:.3f} on average. A jaguar's mirror image shows a coat no "
                 f"jaguar has: a model that sees the coat need not find it similar.</p>")
    chart = plots.plot_mirror_similarity(mirror.histogram_edges, mirror.histogram_counts, mirror.same_identity_mean,
                                         mirror.other_identity_mean, figure(f"mirror_similarity_{split}.png"),
                                         f"Mirror self-similarity ({split})")
    parts.append(img(chart, f"mirror self-similarity {split}"))
    if diagnosis.flanks:
        counts = ", ".join(f"{html.escape(view)} {count}" for view, count in diagnosis.viewpoint_counts.items())
        parts.append(f"<p>Flank retrieval ({counts}): each query of known flank searches only the images of "
                     "the same flank, then only those of the other flank. Left and right flanks carry "
                     "different rosettes: the rosettes find same-flank matches; cross-flank matches well above "
                     "chance come from something else (body, head, site, a flank seen on both sides in "
                     "training).</p>")
        parts.append(_rows_table(diagnosis.flanks))
    else:
        parts.append("<p class='sub'>No viewpoint column in the data: same- vs cross-flank retrieval not "
                     "measured.</p>")
    return "\n".join(parts)


def diagnosis_section(run: RunDir, figure: Callable[[str], Path], img: Callable[[Path, str], str]) -> str:
    """HTML of the section; a note naming `jaguar diagnose` when the run has no diagnosis."""
    parts = ["<h2>Does the model see the coat? (shortcut diagnostics)</h2>"]
    found = [split for split in ("val", "test") if run.has_diagnosis(split)]
    if not found:
        parts.append(f'<div class="missing">No shortcut diagnostics ({html.escape(run.diagnosis_path("val").name)}) '
                     f"— produce them with <code>jaguar diagnose {html.escape(str(run))} --split val</code>.</div>")
        return "\n".join(parts)
    parts.append(f"<p class='sub'>{_EXPLAIN}</p>")
    for split in found:
        try:
            parts.append(_split_part(run.load_diagnosis(split), figure, img))
        except (JaguarError, OSError) as err:
            parts.append(f'<div class="missing">{html.escape(str(err))}</div>')
    return "\n".join(parts)
