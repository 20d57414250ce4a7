"""The evaluator over top-M ranked lists, in O(N * M) memory: the same figures as
`jaguar.retrieval.metrics.evaluate` on the full score matrix, without it (fast-reid's
one-evaluator habit, at gallery scale). AP, INP and CMC are computed by that module's `_figures`
from the ranks of the true matches; this module only finds those ranks.

A true match inside a query's list has its list position as rank. One beyond the list is ranked
exactly: M plus the candidates outside the list that score higher than it (equal scores: lower
index first), counted in row chunks of the Q x G scores, never truncated.

Without the features (a ranked-list file alone), `list_bounds` gives the figures' bounds from
the lists: the ranks beyond them are unknown, so each match outside is placed at both extremes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from jaguar.retrieval.knn import Neighbours, normalise, stable_top
from jaguar.retrieval.metrics import (ArrayLike, MetricsError, RetrievalMetrics, _figures, _no_match_message,
                                      _vector)

_BLOCK_BYTES = 256 << 20  # a row chunk's B x G scores with their int64 keys and buckets


def _rank_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in ranking order: a higher key ranks first. The float32 score's bits made
    monotonic (+0.0 added so -0.0 and 0.0 tie, as they compare equal), then, for equal scores,
    the lower column first: every key of a row is distinct and no tie is left to break."""
    bits = (scores + 0.0).view(torch.int32).long()
    monotonic = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    columns = torch.arange(scores.shape[1], dtype=torch.long)
    return monotonic * (1 << 32) + ((1 << 32) - 1 - columns)


def _count_above_dense(scores: torch.Tensor, targets: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """`_count_above` over every column: each score's bucket among the row's sorted target keys, a
    histogram of the buckets, suffix sums (one pass for all T targets); own code because no
    library call counts ranks against many per-row thresholds in one pass."""
    keys = _rank_keys(scores)
    target_keys = torch.where(present, keys.gather(1, targets), torch.iinfo(torch.long).max)
    sorted_keys, order = target_keys.sort(dim=1)
    bucket = torch.searchsorted(sorted_keys, keys)  # targets ranked after this column: 0..T
    n_targets = targets.shape[1]
    histogram = torch.zeros((scores.shape[0], n_targets + 1), dtype=torch.long)
    histogram.scatter_add_(1, bucket, torch.ones_like(bucket))
    # Target i (in sorted order) is ranked after every column whose bucket is > i.
    above_sorted = histogram.flip(1).cumsum(1).flip(1)[:, 1:]
    return torch.empty_like(above_sorted).scatter_(1, order, above_sorted)


def _count_above(scores: torch.Tensor, targets: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """For each row b of B x G scores and each of its targets (B x T columns, `present` marks the
    real ones): how many columns rank before the target (higher score; equal score, lower column).

    Only columns scoring at least the row's lowest target can rank before any target, and with
    useful features they are a few per cent of the row (a query's last true match is rarely far
    down): those are packed to the left of a B x W table, in column order so that ties still
    break by column, and counted there; rows that keep over a quarter of their columns are
    counted in place."""
    floor = torch.where(present, scores.gather(1, targets), float("inf")).amin(dim=1, keepdim=True)
    keep = scores >= floor
    kept = keep.sum(dim=1)
    wide = kept > scores.shape[1] // 4  # rows with a match far down: counted in place
    if bool(wide.all()):
        return _count_above_dense(scores, targets, present)
    above = torch.empty(targets.shape, dtype=torch.long)
    if bool(wide.any()):
        above[wide] = _count_above_dense(scores[wide], targets[wide], present[wide])
        narrow = (~wide).nonzero().flatten()
        scores, targets, present, keep, kept = scores[narrow], targets[narrow], present[narrow], keep[narrow], kept[narrow]
    else:
        narrow = slice(None)
    width = max(int(kept.max()), 1)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    slot = torch.arange(rows.numel()) - (torch.cumsum(kept, 0) - kept)[rows]
    packed = torch.full((scores.shape[0], width), float("-inf"), dtype=scores.dtype)
    packed[rows, slot] = scores[rows, cols]
    packed_cols = torch.full((scores.shape[0], width), scores.shape[1], dtype=torch.long)
    packed_cols[rows, slot] = cols
    # A present target scores >= floor, so it is among its row's kept columns: find its slot.
    target_slot = torch.where(present, torch.searchsorted(packed_cols, targets), 0).clamp(max=width - 1)
    above[narrow] = _count_above_dense(packed, target_slot, present)
    return above


def _match_pairs(q_label: torch.Tensor, g_label: torch.Tensor, all_vs_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (query, gallery) pair of the same label, self excluded in all-vs-all, in query
    order: O(matches)."""
    g_order = torch.sort(g_label, stable=True).indices
    g_sorted = g_label[g_order]
    first = torch.searchsorted(g_sorted, q_label)
    count = torch.searchsorted(g_sorted, q_label, right=True) - first
    queries = torch.repeat_interleave(torch.arange(q_label.numel()), count)
    offset = torch.arange(queries.numel()) - (torch.cumsum(count, 0) - count)[queries]
    gallery = g_order[first[queries] + offset]
    if all_vs_all:
        keep = gallery != queries
        queries, gallery = queries[keep], gallery[keep]
    return queries, gallery


# The rank given to a match counted as never retrieved: its precision term (at most N / 2^53 a
# query) is below float64's resolution of any AP, and the rank stays exact in float64.
_NEVER_RETRIEVED = 1 << 53


@dataclass(frozen=True)
class ListBounds:
    """What all-vs-all top-k lists alone say of the evaluator's figures (`list_bounds`).

    lower: the true matches beyond each list counted as never retrieved, so AP is AP@k.
    upper: those matches ranked right after the list (k + 1, k + 2, ...), the best they can be.
    Both equal `evaluate`'s figures for a query whose matches are all listed (`complete`), and
    CMC rank-r is exact in both for r <= k; mINP is not bounded (the last match's rank is unknown)."""

    lower: RetrievalMetrics
    upper: RetrievalMetrics
    complete: np.ndarray  # (N,) bool: every true match of the query is in its list
    top_k: int


def list_bounds(ranked: ArrayLike, labels: ArrayLike) -> ListBounds:
    """`ListBounds` of all-vs-all lists (N x k gallery indices, each item's best other items, best
    first, the item itself not among them) of items with these labels (N,): O(N * k + true matches),
    for a ranking whose scores are not at hand (e.g. `jaguar rank`'s file in the report). Raises
    MetricsError on lists of the wrong shape or holding the query itself, or when no query has a
    true match."""
    q_label = _vector("labels", labels, len(labels))
    lists = _checked_lists(ranked, q_label.numel(), all_vs_all=True)
    n, top_k = lists.shape
    list_query, list_rank = (q_label[lists] == q_label[:, None]).nonzero(as_tuple=True)
    _, label_index, label_count = torch.unique(q_label, return_inverse=True, return_counts=True)
    missing = label_count[label_index] - 1 - torch.bincount(list_query, minlength=n)
    beyond_query = torch.repeat_interleave(torch.arange(n), missing)
    nth = torch.arange(beyond_query.numel()) - (torch.cumsum(missing, 0) - missing)[beyond_query]  # 0, 1, ...
    queries, listed = torch.cat([list_query, beyond_query]), list_rank + 1
    message = _no_match_message(True, False, 0, 0)
    lower = _figures(queries, torch.cat([listed, torch.full_like(nth, _NEVER_RETRIEVED)]), q_label, None, message)
    upper = _figures(queries, torch.cat([listed, top_k + 1 + nth]), q_label, None, message)
    return ListBounds(lower, upper, (missing == 0).numpy(), top_k)


def _checked_lists(ranked: ArrayLike, n_query: int, all_vs_all: bool) -> torch.Tensor:
    """Q x M int64 lists, checked: one row a query, and no query listing itself in all-vs-all."""
    lists = torch.as_tensor(np.asarray(ranked) if not isinstance(ranked, torch.Tensor) else ranked).long()
    if lists.ndim != 2 or lists.shape[0] != n_query:
        raise MetricsError(f"ranked lists must be Q x M with Q = {n_query} queries, got {tuple(lists.shape)}")
    if all_vs_all and bool((lists == torch.arange(n_query)[:, None]).any()):
        raise MetricsError("all-vs-all ranked lists hold the query itself; search with the query excluded")
    return lists


class RankedEvaluator:
    """The evaluator over top-M ranked lists (see the module docstring).

    Built once for a set of lists (Q x M gallery indices, each query's M best candidates by the base
    score: cosine of query_features Q x D and gallery_features G x D, L2-normalised here, ties by
    index); gallery_* None means all-vs-all (the lists must not hold the query itself). The ranks
    beyond M depend only on which items each list holds, so `evaluate` then scores any
    re-ordering of the same lists (re-ranking, blends) cheaply. `RankedEvaluator.search` finds the
    lists too, from the same pass. No camera ids or candidate masks (use `evaluate`). Raises
    MetricsError on shapes that do not match, lists holding the query itself, or (in `evaluate`)
    when no query has a true match."""

    def __init__(self, ranked: ArrayLike, query_features: ArrayLike, query_labels: ArrayLike,
                 gallery_features: Optional[ArrayLike] = None, gallery_labels: Optional[ArrayLike] = None, *,
                 chunk: int = 1024) -> None:
        query, gallery = self._setup(query_features, query_labels, gallery_features, gallery_labels)
        lists = self._lists(ranked, query.shape[0])
        pair_query, pair_gallery = self._beyond_pairs(lists, *_match_pairs(self.q_label, self.g_label,
                                                                           self.all_vs_all))
        needing = torch.unique(pair_query)  # queries with a match beyond their list
        step, ranks = self._rows_per_step(gallery.shape[0], chunk), []
        for start in range(0, needing.numel(), step):
            rows = needing[start:start + step]
            first = int(torch.searchsorted(pair_query, rows[0]))
            last = int(torch.searchsorted(pair_query, rows[-1], right=True))
            ranks.append(self._count_block(query[rows] @ gallery.T, rows, lists[rows], pair_query[first:last],
                                           pair_gallery[first:last]))
        self._finish(lists, pair_query, pair_gallery, torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long))
        self.searched = False  # the lists are the caller's: other items cannot be placed against them

    @classmethod
    def search(cls, features: ArrayLike, labels: ArrayLike, top_m: int, *,
               chunk: int = 1024) -> tuple[Neighbours, "RankedEvaluator"]:
        """All-vs-all: each item's top-M other items by cosine, exactly as
        `knn(features, k=top_m, exclude_self=True, backend="torch")` finds them (ties by index), and
        the evaluator of those lists, from one pass over the N x N scores in row chunks. The
        evaluator has to compute every score row to rank the matches beyond M; selecting the
        lists from the same rows costs less than a second search (faiss) would. Raises
        MetricsError / ValueError on bad shapes or values."""
        evaluator = cls.__new__(cls)
        query, _ = evaluator._setup(features, labels, None, None)
        n = query.shape[0]
        top_m = min(int(top_m), n - 1)
        if top_m < 1:
            raise MetricsError(f"ranked lists need M >= 1 and two or more items (M = {top_m}, {n} items)")
        index = torch.empty((n, top_m), dtype=torch.long)
        similarity = torch.empty((n, top_m), dtype=torch.float32)
        pair_query, pair_gallery = _match_pairs(evaluator.q_label, evaluator.g_label, True)
        bounds = torch.searchsorted(pair_query, torch.arange(n + 1))
        beyond_query, beyond_gallery, beyond_rank = [], [], []
        step = evaluator._rows_per_step(n, chunk)
        for start in range(0, n, step):
            stop = min(start + step, n)
            rows = torch.arange(start, stop)
            scores = query[start:stop] @ query.T
            scores[torch.arange(stop - start), rows] = float("-inf")  # the query is no candidate
            similarity[start:stop], index[start:stop] = stable_top(scores, top_m)
            block_query, block_gallery = evaluator._beyond_pairs(
                index[start:stop], pair_query[bounds[start]:bounds[stop]] - start,
                pair_gallery[bounds[start]:bounds[stop]])
            beyond_query.append(block_query + start)
            beyond_gallery.append(block_gallery)
            beyond_rank.append(evaluator._count_block(scores, rows, index[start:stop], block_query + start,
                                                      block_gallery))
        evaluator._finish(index, torch.cat(beyond_query), torch.cat(beyond_gallery), torch.cat(beyond_rank))
        evaluator.searched = True  # the lists are the base top M: `evaluate` may place other items
        return Neighbours(index, similarity), evaluator

    def _setup(self, query_features: ArrayLike, query_labels: ArrayLike, gallery_features: Optional[ArrayLike],
               gallery_labels: Optional[ArrayLike]) -> tuple[torch.Tensor, torch.Tensor]:
        self.all_vs_all = gallery_features is None
        query = normalise("query features", query_features)
        gallery = query if self.all_vs_all else normalise("gallery features", gallery_features)
        self.q_label = _vector("query labels", query_labels, query.shape[0])
        self.g_label = self.q_label if self.all_vs_all else _vector("gallery labels", gallery_labels,
                                                                     gallery.shape[0])
        self.query, self.gallery = query, gallery
        return query, gallery

    @staticmethod
    def _rows_per_step(n_gallery: int, chunk: int) -> int:
        return max(1, min(int(chunk), _BLOCK_BYTES // (24 * max(n_gallery, 1))))

    def _beyond_pairs(self, lists: torch.Tensor, pair_query: torch.Tensor,
                      pair_gallery: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The match pairs (query = row of `lists`, gallery) whose gallery item is not in that row."""
        listed = torch.zeros(pair_query.numel(), dtype=torch.bool)
        for start in range(0, pair_query.numel(), 1 << 16):  # pairs x M comparisons at a time
            part = slice(start, start + (1 << 16))
            listed[part] = (lists[pair_query[part]] == pair_gallery[part, None]).any(dim=1)
        return pair_query[~listed], pair_gallery[~listed]

    def _count_block(self, scores: torch.Tensor, rows: torch.Tensor, lists: torch.Tensor, pair_query: torch.Tensor,
                     pair_gallery: torch.Tensor) -> torch.Tensor:
        """1-based ranks of the beyond-M pairs (query in `rows`, ascending; in pair order) from these
        rows' B x G scores (overwritten: listed candidates and the query itself set to -inf)."""
        if pair_query.numel() == 0:
            return torch.empty(0, dtype=torch.long)
        local = torch.searchsorted(rows, pair_query)  # each pair's row of the block
        counts = torch.bincount(local, minlength=rows.numel())
        if bool((counts == 0).any()):  # only rows with such pairs are counted
            has = (counts > 0).nonzero().flatten()
            scores, rows, lists, counts = scores[has], rows[has], lists[has], counts[has]
        if self.all_vs_all:
            scores[torch.arange(rows.numel()), rows] = float("-inf")  # the query is no candidate
        scores.scatter_(1, lists, float("-inf"))  # listed candidates are ranked already
        first = torch.cumsum(counts, 0) - counts
        pair = first[:, None] + torch.arange(max(int(counts.max()), 1))
        present = pair < (first + counts)[:, None]
        pair = torch.where(present, pair, 0)
        above = _count_above(scores, pair_gallery[pair], present)
        ranks = torch.empty(pair_query.numel(), dtype=torch.long)
        ranks[pair[present]] = lists.shape[1] + 1 + above[present]
        return ranks

    def _finish(self, lists: torch.Tensor, beyond_query: torch.Tensor, beyond_gallery: torch.Tensor,
                beyond_rank: torch.Tensor) -> None:
        self.sorted_lists = lists.sort(dim=1).values
        self.beyond_query, self.beyond_gallery, self.beyond_rank = beyond_query, beyond_gallery, beyond_rank

    def _lists(self, ranked: ArrayLike, n_query: int) -> torch.Tensor:
        return _checked_lists(ranked, n_query, self.all_vs_all)

    def evaluate(self, ranked: ArrayLike, reordered: bool = False) -> RetrievalMetrics:
        """The figures of these lists in this order; reordered=True when re-ordered within the top
        M (e.g. re-ranked), which the figures then say (`reordered_top_m`). On an evaluator made by
        `search`, a list may also swap some of its items for items from beyond M (re-ranking
        brings them in): everything not in a list then follows it in base score order, the
        swapped-out items first."""
        lists = self._lists(ranked, self.q_label.numel())
        width = self.sorted_lists.shape[1]
        if lists.shape[1] != width:
            raise MetricsError(f"ranked lists have {lists.shape[1]} entries a query; the evaluator was built on "
                               f"{width}")
        found = torch.searchsorted(self.sorted_lists, lists).clamp(max=width - 1)
        in_base = self.sorted_lists.gather(1, found) == lists
        list_query, list_rank = (self.g_label[lists] == self.q_label[:, None]).nonzero(as_tuple=True)
        beyond_query, beyond_rank = self.beyond_query, self.beyond_rank
        if not bool(in_base.all()):
            if not self.searched:
                raise MetricsError("ranked lists hold other items than the lists the evaluator was built on; "
                                   "build it with RankedEvaluator.search to score lists that bring in items "
                                   "from beyond M")
            beyond_query, beyond_rank = self._swapped(lists, in_base)
        return _figures(torch.cat([list_query, beyond_query]), torch.cat([list_rank + 1, beyond_rank]),
                        self.q_label, width if reordered else None, _no_match_message(self.all_vs_all, False, 0, 0))

    def _pair_scores(self, rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """cos(query rows[i], gallery items[i, k]): R x K, the gathered vectors ~64 MB at a time."""
        out = torch.empty(items.shape, dtype=torch.float32)
        step = max(1, (64 << 20) // (4 * max(items.shape[1], 1) * self.gallery.shape[1]))
        for start in range(0, rows.numel(), step):
            part = slice(start, start + step)
            out[part] = torch.einsum("rd,rkd->rk", self.query[rows[part]], self.gallery[items[part]])
        return out

    def _swapped(self, lists: torch.Tensor, in_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks of the true matches outside lists that swapped items In (from beyond the built
        lists L) for items Out (of L), |In| = |Out| a row. Outside a new list, base order puts Out
        first (L outranks everything beyond it): a match in Out is ranked M + 1 + the Out items
        before it; a match beyond L keeps its built rank (M + 1 + those outside L before it),
        plus the In items after it (they left the outside, and Out joined it ahead)."""
        width = lists.shape[1]
        rows = (~in_base).any(dim=1).nonzero().flatten()
        new, fresh = lists[rows], ~in_base[rows]
        old = self.sorted_lists[rows]
        new_sorted = new.sort(dim=1).values
        gone = new_sorted.gather(1, torch.searchsorted(new_sorted, old).clamp(max=width - 1)) != old

        def packed(items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            count = int(mask.sum(dim=1).max())
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]
            items, valid = items.gather(1, order), mask.gather(1, order)
            return items, valid, self._pair_scores(rows, items)

        def before(score_a, item_a, score_b, item_b):  # a ranks before b in base order
            return (score_a > score_b) | ((score_a == score_b) & (item_a < item_b))

        in_items, in_valid, in_score = packed(new, fresh)
        out_items, out_valid, out_score = packed(old, gone)
        # Matches swapped out: M + 1 + the Out items before them (their place in base order; the
        # padding, scored -inf, sorts last).
        out_score = out_score.masked_fill(~out_valid, float("-inf"))
        by_item = out_items.sort(dim=1)
        by_score = torch.sort(out_score.gather(1, by_item.indices), dim=1, descending=True, stable=True).indices
        ahead = torch.empty_like(by_score).scatter_(
            1, by_item.indices.gather(1, by_score), torch.arange(by_score.shape[1]).expand_as(by_score).contiguous())
        out_match = out_valid & (self.g_label[out_items] == self.q_label[rows, None])
        out_query, out_rank = rows[:, None].expand_as(out_items)[out_match], (width + 1 + ahead)[out_match]
        # Matches beyond L in these rows: dropped when brought in, else later by the In items after them.
        local = torch.searchsorted(rows, self.beyond_query).clamp(max=max(rows.numel() - 1, 0))
        affected = (rows[local] == self.beyond_query).nonzero().flatten()
        r, item = local[affected], self.beyond_gallery[affected]
        score = self._pair_scores(self.beyond_query[affected], item[:, None])[:, 0]
        brought = ((in_items[r] == item[:, None]) & in_valid[r]).any(dim=1)
        after = (before(score[:, None], item[:, None], in_score[r], in_items[r]) & in_valid[r]).sum(dim=1)
        beyond_rank = self.beyond_rank.clone()
        beyond_rank[affected] += after
        keep = torch.ones(self.beyond_query.numel(), dtype=torch.bool)
        keep[affected[brought]] = False
        return (torch.cat([self.beyond_query[keep], out_query]), torch.cat([beyond_rank[keep], out_rank]))


def evaluate_ranked(ranked: ArrayLike, query_features: ArrayLike, query_labels: ArrayLike,
                    gallery_features: Optional[ArrayLike] = None, gallery_labels: Optional[ArrayLike] = None, *,
                    reordered: bool = False, chunk: int = 1024) -> RetrievalMetrics:
    """`RankedEvaluator(ranked, ...).evaluate(ranked, reordered)`: the figures of one set of
    top-M lists, equal to `evaluate(query_features @ gallery_features.T, ..., kind="similarity")`
    (1e-9) when the lists hold the top M by that score in that order."""
    evaluator = RankedEvaluator(ranked, query_features, query_labels, gallery_features, gallery_labels, chunk=chunk)
    return evaluator.evaluate(ranked, reordered)
