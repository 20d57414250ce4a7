"""Near-duplicate groups: camera-trap bursts (several near-identical frames seconds apart) and copies
of one photo (re-encoded, re-cropped, re-exposed), which must stay on one side of every split.

Two ways to find them, both giving groups as the connected components of a "near-duplicate" graph:
- "phash" (`jaguar prep`): perceptual hashes (imagehash's pHash: the lowest 8 x 8 and 16 x 16 DCT
  frequencies of a grey image against their median) of the masked animal cropped to its mask; two
  images are near-duplicates when both hashes differ in at most `max_distances` bits.
- "embedding" (`jaguar dedup RUN_DIR`): a trained model's features; near-duplicates when their
  cosine similarity is at least `min_cosine` (0.99 found 317 pairs among the 1,895 real photos).

In the manifest, `groups[method]` is {"method", the thresholds, "groups": [{"id", "members":
[[split, filename], ...], "pairs": [[i, j, [64-bit, 256-bit distance] or cosine], ...] (indexes into
members: the edges that formed the group)}]}. Only groups of two or more images are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from jaguar.errors import JaguarError

# Two pHashes of the masked animal: the 64-bit one (8 x 8 frequencies) tolerates small pose changes,
# the 256-bit one (16 x 16) tells apart two photos of one animal in a similar pose. A pair is a
# near-duplicate when both are close. Measured on synthetic bursts (2-5 frames, ~1 degree / 1% pose
# and 5% exposure jitter, fresh sensor noise) at 128-192 px: this rule keeps 96-100% of the planted
# bursts whole and merged no two identities; at 64 px the sensor noise splits about a third of them.
HASH_SIZES = (8, 16)
PHASH_MAX_DISTANCES = (10, 48)  # bits, for HASH_SIZES
EMBEDDING_MIN_COSINE = 0.99
_BLOCK = 2048  # rows compared at once: memory O(block x N), never N x N


class DedupError(JaguarError, ValueError):
    """A near-duplicate search that cannot be run as asked; the message names the value at fault."""


@dataclass
class NearDuplicates:
    """Groups of near-duplicate images (two or more each) found by one method."""

    method: str  # "phash" | "embedding"
    threshold: list[int] | float  # max Hamming distances per hash size (phash) or min cosine (embedding)
    groups: list[dict]  # {"id", "members": [[split, filename]], "pairs": [[i, j, score]]}

    def to_json(self) -> dict:
        if self.method == "phash":
            return {"method": "phash", "hash_sizes": list(HASH_SIZES), "max_distances": list(self.threshold),
                    "groups": self.groups}
        return {"method": self.method, "min_cosine": self.threshold, "groups": self.groups}

    @classmethod
    def from_json(cls, entry: dict) -> "NearDuplicates":
        key = "max_distances" if entry["method"] == "phash" else "min_cosine"
        return cls(entry["method"], entry[key], entry["groups"])

    @property
    def images(self) -> int:
        return sum(len(group["members"]) for group in self.groups)

    def cross_split_pairs(self, first: str = "train", second: str = "test") -> list[tuple[str, str, float]]:
        """(first-split filename, second-split filename, score) of every near-duplicate edge between the two."""
        found = []
        for group in self.groups:
            members = group["members"]
            for i, j, score in group["pairs"]:
                (split_i, name_i), (split_j, name_j) = members[i], members[j]
                if (split_i, split_j) == (first, second):
                    found.append((name_i, name_j, score))
                elif (split_i, split_j) == (second, first):
                    found.append((name_j, name_i, score))
        return found


def animal_hash(rgba: np.ndarray) -> np.ndarray:
    """The pHashes (imagehash.phash, HASH_SIZES) of the animal in an H x W x 4 uint8 RGBA image, as one
    bool array of 8*8 + 16*16 bits: the grey image cropped to the mask's bounding box, the outside of the
    mask filled with the animal's mean grey so that neither the background nor the outline (the same
    for every animal in a pose) decides the hash. An empty mask hashes the whole image."""
    import imagehash

    alpha = rgba[..., 3]
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if len(rows) and len(cols):
        rgba = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    grey = np.asarray(Image.fromarray(np.ascontiguousarray(rgba[..., :3])).convert("L"), dtype=np.float32)
    weight = rgba[..., 3].astype(np.float32) / 255.0 if len(rows) else np.ones_like(grey)
    mean = float((grey * weight).sum() / max(float(weight.sum()), 1e-6))
    image = Image.fromarray(np.clip(np.round(grey * weight + mean * (1 - weight)), 0, 255).astype(np.uint8), "L")
    return np.concatenate([imagehash.phash(image, hash_size=size).hash.ravel() for size in HASH_SIZES])


def hash_members(members: dict[str, bytes]) -> np.ndarray:
    """`animal_hash` of a sample's encoded shard members ({"png": ...} or {"jpg": ..., "mask.png": ...})."""
    from jaguar.data.shards import decode_rgba

    return animal_hash(decode_rgba({f".{extension}": data for extension, data in members.items()}, "a new sample"))


def _near_pairs(vectors: np.ndarray, min_dot: float) -> list[tuple[int, int, float]]:
    """(i, j, dot) for i < j with vectors[i] . vectors[j] >= min_dot, in row blocks."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    pairs = []
    for start in range(0, len(vectors), _BLOCK):
        dots = vectors[start:start + _BLOCK] @ vectors.T
        rows, cols = np.nonzero(dots >= min_dot)
        keep = cols > rows + start
        pairs += [(int(r + start), int(c), float(dots[r, c])) for r, c in zip(rows[keep], cols[keep])]
    return pairs


def _components(keys: Sequence[tuple[str, str]], pairs: list[tuple[int, int, object]], method: str) -> list[dict]:
    """Connected components of the pair graph as manifest groups, ordered by their first member."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return []
    i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    graph = coo_matrix((np.ones(len(pairs)), (i, j)), shape=(len(keys), len(keys)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for index in sorted(set(i.tolist()) | set(j.tolist())):
        members.setdefault(int(component[index]), []).append(index)
    edges: dict[int, list[tuple[int, int, float]]] = {}
    for a, b, score in pairs:
        edges.setdefault(int(component[a]), []).append((a, b, score))
    groups = []
    for number, comp in enumerate(sorted(members, key=lambda c: members[c][0])):
        position = {index: k for k, index in enumerate(members[comp])}
        groups.append({"id": f"{method}-{number:05d}",
                       "members": [list(keys[index]) for index in members[comp]],
                       "pairs": [[position[a], position[b], score] for a, b, score in edges[comp]]})
    return groups


def hash_groups(keys: Sequence[tuple[str, str]], hashes: Sequence[np.ndarray],
                max_distances: Sequence[int] = PHASH_MAX_DISTANCES) -> NearDuplicates:
    """Near-duplicate groups of images `keys` ((split, filename) each) whose `animal_hash`es differ in at
    most max_distances[k] bits for every hash size k. Pairs come from a blocked +-1 dot product on the
    first hash (Hamming = (bits - dot) / 2), O(N^2) time and O(block x N) memory (about a second for
    the 2,266 challenge images); a pair's score is the list of its distances."""
    if len(keys) != len(hashes):
        raise ValueError(f"{len(keys)} image keys but {len(hashes)} hashes")
    max_distances = [int(d) for d in max_distances]
    if not keys:
        return NearDuplicates("phash", max_distances, [])
    signs = np.where(np.asarray(hashes, dtype=bool), 1.0, -1.0).astype(np.float32)
    bounds = np.cumsum([0] + [size * size for size in HASH_SIZES])
    if signs.shape[1] != bounds[-1]:
        raise ValueError(f"hashes have {signs.shape[1]} bits; animal_hash gives {bounds[-1]}")
    first = signs[:, :bounds[1]]
    candidates = _near_pairs(first, bounds[1] - 2 * max_distances[0] - 0.5)
    pairs = []
    for a, b, _ in candidates:
        distances = [int(round((bounds[k + 1] - bounds[k] - float(signs[a, bounds[k]:bounds[k + 1]]
                                                                  @ signs[b, bounds[k]:bounds[k + 1]])) / 2))
                     for k in range(len(HASH_SIZES))]
        if all(d <= limit for d, limit in zip(distances, max_distances)):
            pairs.append((a, b, distances))
    return NearDuplicates("phash", max_distances, _components(keys, pairs, "phash"))


def embedding_groups(keys: Sequence[tuple[str, str]], embeddings: np.ndarray,
                     min_cosine: float = EMBEDDING_MIN_COSINE) -> NearDuplicates:
    """Near-duplicate groups of images `keys` whose embeddings (N x D, any scale) have cosine >= min_cosine."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(keys) != len(embeddings):
        raise ValueError(f"{len(keys)} image keys but {len(embeddings)} embeddings")
    if not -1.0 <= min_cosine <= 1.0:
        raise DedupError(f"--min-cosine must be in [-1, 1], got {min_cosine}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    pairs = [(a, b, round(cosine, 6)) for a, b, cosine in _near_pairs(unit, min_cosine)]
    return NearDuplicates("embedding", min_cosine, _components(keys, pairs, "embedding"))


def carry_groups(manifest_groups: dict | None, names: set[str], new_split: str) -> dict:
    """The groups of a manifest restricted to the images `names`, renamed into split `new_split`, ids
    kept: what a shards folder made from another one's images (pseudo-labels) records, so that its
    images still join their source groups (a group may then hold a single image)."""
    carried = {}
    for method, entry in (manifest_groups or {}).items():
        found = NearDuplicates.from_json(entry)
        kept = []
        for group in found.groups:
            inside = [k for k, (_, name) in enumerate(group["members"]) if name in names]
            if inside:
                renumber = {old: new for new, old in enumerate(inside)}
                kept.append({"id": group["id"], "members": [[new_split, group["members"][k][1]] for k in inside],
                             "pairs": [[renumber[i], renumber[j], score] for i, j, score in group["pairs"]
                                       if i in renumber and j in renumber]})
        carried[method] = NearDuplicates(found.method, found.threshold, kept).to_json()
    return carried


def summary_lines(manifest_groups: dict | None) -> list[str]:
    """Prep's summary of the near-duplicate groups in a manifest; a warning when train and test share frames."""
    from jaguar.data.manifest import MANIFEST_NAME

    lines = []
    for method, entry in (manifest_groups or {}).items():
        found = NearDuplicates.from_json(entry)
        rule = (f"pHash distances <= {'/'.join(map(str, found.threshold))} bits at "
                f"{'/'.join(str(s * s) for s in HASH_SIZES)}-bit" if method == "phash"
                else f"cosine >= {found.threshold:g}")
        lines.append(f"  near-duplicates ({rule}): {len(found.groups)} group(s) holding {found.images} images")
        cross = found.cross_split_pairs()
        if cross:
            shown = ", ".join(f"{a}~{b}" for a, b, _ in cross[:5]) + (", ..." if len(cross) > 5 else "")
            # Measured (benchmarks/dedup_false_positives.py): the rule cannot tell a burst from two photos
            # of one animal in a similar pose, so on burst-free synthetic sets it pairs 20-44 of 24,000
            # train/test pairs all the same; the warning says what each pair may be, not that it is a copy.
            lines.append(f"  warning: {len(cross)} train/test pair(s) look like near-duplicates: {shown}. Each is "
                         f"either one frame or burst in both sets (test scores would be inflated) or two photos of "
                         f"one animal in a similar pose, which pHash cannot tell apart; look at a few ({MANIFEST_NAME} "
                         f"groups) before trusting test figures")
    return lines
