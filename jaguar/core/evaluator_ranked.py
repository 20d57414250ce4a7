"""The evaluator over top-M ranked lists, in O(N * M) memory: the same figures as
`jaguar.core.evaluator.evaluate` on the full score matrix, without it (fast-reid's
one-evaluator habit, at gallery scale). AP, INP and CMC are computed by that module's `_figures`
from the ranks of the true matches; this module only finds those ranks.

Ties are ranked as `evaluate` ranks them: pessimistically, every non-match of equal score before
a true match (`jaguar.core.ranks`). On the base lists (not re-ordered) a true match ranks
after the non-matches scoring at least as high, in the list and beyond it; a true match beyond
the list ranks M + the non-matches beyond it scoring at least as high + its place among the true
matches beyond it. Re-ordered lists rank their items by list position, the rest as above.

Cost: finding the ranks beyond M needs every score row (no bound from the lists says how many
candidates beyond them outscore a match), so building the evaluator is O(Q x G x D) for the
score rows plus O(Q x G log T) for the counting (T = true matches a query), in row chunks of
O(chunk x G) memory; evaluating lists afterwards is O(Q x M). `RankedEvaluator.search` finds the
lists from the same rows.

Without the features (a ranked-list file alone), `list_bounds` gives the figures' bounds from
the lists: the ranks beyond them are unknown, so each match outside is placed at both extremes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from jaguar.core.knn import Neighbours, normalise, stable_top
from jaguar.core.ranks import count_at_or_above, ranked_matches
from jaguar.core.evaluator import ArrayLike, MetricsError, RetrievalMetrics, _figures, _no_match_message
from jaguar.core.evaluator import _vector as _label_array


def _vector(name: str, value: ArrayLike, length: int) -> torch.Tensor:
    """The evaluator's checked int64 labels (`metrics._vector`) as a tensor."""
    return torch.from_numpy(_label_array(name, value, length))

_BLOCK_BYTES = 256 << 20  # a row chunk's B x G scores with their masks and counting buckets


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
        self._start()
        step = self._rows_per_step(gallery.shape[0], chunk)
        for start in range(0, query.shape[0], step):
            self._count_block(query[start:start + step] @ gallery.T, start, lists[start:start + step])
        self._finish(lists)
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
        evaluator._start()
        step = evaluator._rows_per_step(n, chunk)
        for start in range(0, n, step):
            stop = min(start + step, n)
            scores = query[start:stop] @ query.T
            scores[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")  # no candidate
            similarity[start:stop], index[start:stop] = stable_top(scores, top_m)
            evaluator._count_block(scores, start, index[start:stop])
        evaluator._finish(index)
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
        return max(1, min(int(chunk), _BLOCK_BYTES // (32 * max(n_gallery, 1))))

    def _start(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = {name: [] for name in (
            "list_scores", "boundary_non_match", "query", "gallery", "rank", "above")}

    def _count_block(self, scores: torch.Tensor, start: int, lists: torch.Tensor) -> None:
        """What the evaluator keeps of these rows' B x G base scores (queries start, start + 1, ...):
        the listed items' scores, the non-matches beyond each list scoring at least its lowest
        (a tie across the list's end), and the true matches beyond the list with their ranks."""
        rows = torch.arange(start, start + scores.shape[0])
        match = self.q_label[rows, None] == self.g_label[None, :]
        outside = torch.ones(scores.shape, dtype=torch.bool)
        if self.all_vs_all:
            outside[torch.arange(rows.numel()), rows] = False
        outside.scatter_(1, lists, False)
        list_scores = scores.gather(1, lists)
        outside_non_match = outside & ~match
        boundary = list_scores.min(dim=1, keepdim=True).values
        beyond_row, beyond_gallery, beyond_rank, above = ranked_matches(scores, outside & match, outside_non_match)
        parts = self._parts
        parts["list_scores"].append(list_scores)
        parts["boundary_non_match"].append(count_at_or_above(scores, outside_non_match, boundary)[:, 0])
        parts["query"].append(beyond_row + start)
        parts["gallery"].append(beyond_gallery)
        parts["rank"].append(lists.shape[1] + beyond_rank)
        parts["above"].append(above)

    def _finish(self, lists: torch.Tensor) -> None:
        parts = {name: torch.cat(values) for name, values in self._parts.items()}
        del self._parts
        self.sorted_lists, order = lists.sort(dim=1)
        self.sorted_list_scores = parts["list_scores"].gather(1, order)
        self.boundary = self.sorted_list_scores.min(dim=1).values
        self.boundary_non_match = parts["boundary_non_match"]
        self.beyond_query, self.beyond_gallery = parts["query"], parts["gallery"]
        self.beyond_rank, self.beyond_above = parts["rank"], parts["above"]

    def _lists(self, ranked: ArrayLike, n_query: int) -> torch.Tensor:
        return _checked_lists(ranked, n_query, self.all_vs_all)

    def evaluate(self, ranked: ArrayLike, reordered: bool = False) -> RetrievalMetrics:
        """The figures of these lists; reordered=True when re-ordered within the top M (e.g.
        re-ranked): each list is then ranked in its order, which the figures say
        (`reordered_top_m`); reordered=False: the lists are the built ones in base order, ranked by
        their base scores (ties as `evaluate`). On an evaluator made by `search`, a list may also
        swap some of its items for items from beyond M (re-ranking brings them in): it is then
        ranked in its order, and everything not in it follows in base score order."""
        lists = self._lists(ranked, self.q_label.numel())
        width = self.sorted_lists.shape[1]
        if lists.shape[1] != width:
            raise MetricsError(f"ranked lists have {lists.shape[1]} entries a query; the evaluator was built on "
                               f"{width}")
        found = torch.searchsorted(self.sorted_lists, lists).clamp(max=width - 1)
        in_base = self.sorted_lists.gather(1, found) == lists
        beyond_query, beyond_rank = self.beyond_query, self.beyond_rank
        if not bool(in_base.all()):
            if not self.searched:
                raise MetricsError("ranked lists hold other items than the lists the evaluator was built on; "
                                   "build it with RankedEvaluator.search to score lists that bring in items "
                                   "from beyond M")
            beyond_query, beyond_rank = self._swapped(lists, in_base)
        if reordered or not bool(in_base.all()):
            list_query, list_rank = (self.g_label[lists] == self.q_label[:, None]).nonzero(as_tuple=True)
            list_rank = list_rank + 1
        else:
            list_query, list_rank = self._base_list_ranks()
        return _figures(torch.cat([list_query, beyond_query]), torch.cat([list_rank, beyond_rank]),
                        self.q_label, width if reordered else None, _no_match_message(self.all_vs_all, False, 0, 0))

    def _base_list_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, rank) of the true matches in the built lists, ranked by base score: after the
        listed non-matches scoring at least as high and, at the list's lowest score, the
        non-matches beyond the list that tie it."""
        list_match = self.g_label[self.sorted_lists] == self.q_label[:, None]
        rows, columns, ranks, _ = ranked_matches(self.sorted_list_scores, list_match, ~list_match)
        at_boundary = self.sorted_list_scores[rows, columns] <= self.boundary[rows]
        return rows, ranks + torch.where(at_boundary, self.boundary_non_match[rows], 0)

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
        lists L) for items Out (of L). Outside a new list (O' = beyond L, less In, plus Out) a
        true match ranks M + the non-matches of O' scoring at least as high + its place among the
        true matches of O'. The non-matches beyond L were counted when built (for an Out item,
        those tying L's lowest score); In's and Out's are added here from their scores."""
        width = lists.shape[1]
        rows = (~in_base).any(dim=1).nonzero().flatten()
        new, fresh = lists[rows], ~in_base[rows]
        old = self.sorted_lists[rows]
        new_sorted = new.sort(dim=1).values
        gone = new_sorted.gather(1, torch.searchsorted(new_sorted, old).clamp(max=width - 1)) != old

        def packed(items: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            count = int(mask.sum(dim=1).max())
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]
            items, valid = items.gather(1, order), mask.gather(1, order)
            return items, valid, self._pair_scores(rows, items), order

        in_items, in_valid, in_score, _ = packed(new, fresh)
        out_items, out_valid, out_score, out_order = packed(old, gone)
        own = self.q_label[rows, None]
        in_non_match = in_valid & (self.g_label[in_items] != own)
        out_match = out_valid & (self.g_label[out_items] == own)
        out_non_match = out_valid & ~out_match
        # The true matches of O' in these rows: beyond L and not brought in, then those of Out.
        local = torch.searchsorted(rows, self.beyond_query).clamp(max=max(rows.numel() - 1, 0))
        affected = (rows[local] == self.beyond_query).nonzero().flatten()
        r, item = local[affected], self.beyond_gallery[affected]
        score = self._pair_scores(self.beyond_query[affected], item[:, None])[:, 0]
        brought = ((in_items[r] == item[:, None]) & in_valid[r]).any(dim=1)
        out_r, out_slot = out_match.nonzero(as_tuple=True)
        out_base = self.sorted_list_scores[rows].gather(1, out_order)[out_r, out_slot]
        out_above = torch.where(out_base <= self.boundary[rows[out_r]], self.boundary_non_match[rows[out_r]], 0)
        kept = ~brought
        match_r = torch.cat([r[kept], out_r])
        match_score = torch.cat([score[kept], out_score[out_r, out_slot]])
        above = torch.cat([self.beyond_above[affected][kept], out_above])
        above = (above - ((in_score[match_r] >= match_score[:, None]) & in_non_match[match_r]).sum(dim=1)
                 + ((out_score[match_r] >= match_score[:, None]) & out_non_match[match_r]).sum(dim=1))
        # Place among the row's true matches of O', best first.
        order = torch.sort(match_score, descending=True, stable=True).indices
        order = order[torch.sort(match_r[order], stable=True).indices]
        count = torch.bincount(match_r, minlength=rows.numel())
        place = torch.empty_like(order)
        place[order] = torch.arange(order.numel()) - (torch.cumsum(count, 0) - count)[match_r[order]] + 1
        keep = torch.ones(self.beyond_query.numel(), dtype=torch.bool)
        keep[affected] = False
        return (torch.cat([self.beyond_query[keep], rows[match_r]]),
                torch.cat([self.beyond_rank[keep], width + above + place]))
