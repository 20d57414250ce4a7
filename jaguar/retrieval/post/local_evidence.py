"""A split's local pattern evidence (`jaguar match`'s SplitMatches, RUN/local/<split>.safetensors)
lined up with the images a stage ranks: each image's shortlist as positions into those images, its
verified inlier counts, and the correspondences kept for display. The fusion itself is
jaguar.retrieval.post.fusion; where it enters a ranking, jaguar.retrieval.post.search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from jaguar.errors import JaguarError, MissingInputError
from jaguar.retrieval.local.store import SplitMatches
from jaguar.retrieval.post.fusion import FusionModel

if TYPE_CHECKING:
    from jaguar.run import PostResult, RunDir


class LocalEvidenceError(JaguarError, ValueError):
    """Local matches that do not belong to the features they are used with; the message names the
    file and the command that makes them again."""


@dataclass
class LocalEvidence:
    """The shortlist matches of N images (one set searched against itself).

    shortlist: (N, B) int64 positions into the N images (-1: none, or a candidate outside these
    images); scores: (N, B) float64 verified inliers aligned with it; matches: the split's SplitMatches
    the rows come from; rows: (N,) int64, image i's row in `matches`."""

    shortlist: np.ndarray
    scores: np.ndarray
    matches: SplitMatches
    rows: np.ndarray

    @property
    def width(self) -> int:
        """B, the shortlist width the split was matched at."""
        return int(self.matches.shortlist.shape[1])

    def subset(self, names: Sequence[str]) -> "LocalEvidence":
        """The evidence of the images `names` (a subset of the split, any order): shortlisted
        candidates outside them become -1. Raises LocalEvidenceError naming an image the split's
        matches do not hold."""
        position = {name: i for i, name in enumerate(self.matches.names)}
        missing = [name for name in names if name not in position]
        if missing:
            raise LocalEvidenceError(f"{len(missing)} image(s) have no local matches, e.g. {missing[:3]}; re-run "
                                     f"`jaguar match` on the split these images come from")
        rows = np.array([position[name] for name in names], dtype=np.int64)
        inside = np.full(len(self.matches.names), -1, dtype=np.int64)
        inside[rows] = np.arange(len(rows))
        split_shortlist = self.matches.shortlist[rows]
        shortlist = np.where(split_shortlist >= 0, inside[np.maximum(split_shortlist, 0)], -1)
        scores = np.where(shortlist >= 0, self.matches.matches.scores[rows].astype(np.float64), 0.0)
        return LocalEvidence(shortlist, scores, self.matches, rows)

    def correspondences(self, query: int, gallery: int) -> Optional[tuple[np.ndarray, np.ndarray, int]]:
        """(query_xy, gallery_xy, inliers) of the verified match of image `query` with image `gallery`
        (positions into these N images) when `jaguar match` kept its correspondences (one of the
        query's best candidates), else None."""
        columns = np.flatnonzero(self.shortlist[query] == gallery)
        if not len(columns):
            return None
        row = int(self.rows[query])
        kept = np.flatnonzero(self.matches.matches.best[row] == columns[0])
        if not len(kept):
            return None
        query_xy, gallery_xy = self.matches.matches.correspondences(row, int(kept[0]))
        return query_xy, gallery_xy, int(self.scores[query, columns[0]])


def _features_sha256(path) -> str:
    """The content checksum a features file records in its metadata ("" when it records none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return (handle.metadata() or {}).get("sha256", "")
    except (OSError, ValueError):
        return ""


def match_command(run: "RunDir", split: str) -> str:
    return f"jaguar match {run.path} --split {split}"


def load_local_evidence(run: "RunDir", split: str, names: Sequence[str], required: bool = False
                        ) -> Optional[LocalEvidence]:
    """The split's local matches (RUN/local/<split>.safetensors) lined up with `names`, the split's
    feature names in the features file's order (which the matches must have been made for: same
    names, same order, and, where the matches record it, the features file's checksum: `jaguar match`
    shortlists by them). None when the file is absent and not `required`; MissingInputError naming
    `jaguar match RUN --split SPLIT` when it is; LocalEvidenceError when it belongs to other features."""
    path = run.local_matches_path(split)
    if not path.is_file():
        if required:
            raise MissingInputError(f"{path} does not exist, and the run's chosen post-processing fuses the global "
                                    f"similarity with local matches: run `{match_command(run, split)}` first")
        return None
    matches = SplitMatches.load(path, f"re-run `{match_command(run, split)} --force`")
    if list(matches.names) != list(names):
        raise LocalEvidenceError(f"{path} was matched for other {split} features ({len(matches.names)} images, "
                                 f"the features file holds {len(names)}, or in another order): re-run "
                                 f"`{match_command(run, split)} --force`")
    recorded, current = matches.meta.get("features_sha256", ""), _features_sha256(run.features_path(split))
    if recorded and current and recorded != current:  # the same images, features extracted again since
        raise LocalEvidenceError(f"{path} was matched on shortlists of earlier {split} features than "
                                 f"{run.features_path(split)}: re-run `{match_command(run, split)}`")
    return LocalEvidence(matches.shortlist, np.where(matches.shortlist >= 0, matches.matches.scores, 0.0)
                         .astype(np.float64), matches, np.arange(len(names), dtype=np.int64))


def split_evidence(run: "RunDir", split: str, names: Sequence[str]) -> Optional[LocalEvidence]:
    """The split's local matches lined up with `names`, some of the split's images in any order
    (e.g. its labelled test images); None when the split has no matches file. The matches must
    belong to the split's features file (`load_local_evidence`'s errors)."""
    if not run.local_matches_path(split).is_file():
        return None
    evidence = load_local_evidence(run, split, run.load_features(split).names)
    return evidence if list(names) == list(evidence.matches.names) else evidence.subset(names)


def run_fusion(run: "RunDir", post: Optional["PostResult"], split: str, names: Sequence[str]
               ) -> tuple[Optional[FusionModel], Optional[LocalEvidence]]:
    """(fusion, the split's evidence) when the run's chosen setting fuses (post.json's fusion
    adopted), else (None, None). Raises MissingInputError naming `jaguar match RUN --split SPLIT` when
    it fuses and the split has no matches, FusionError when post.json's fusion is malformed."""
    if post is None or not post.fuses:
        return None, None
    fusion = FusionModel.from_dict(post.fusion.model, f"{run.post_path} fusion")
    return fusion, load_local_evidence(run, split, names, required=True)
