"""The local features of an identification's gallery: the run's training images
(RUN/features/train.local.safetensors, `jaguar match RUN --split train`, extracted first when missing,
announced) and its enrolled photos (RunDir.enrolled_local_path, written by `jaguar enroll` beside the
enrolled embeddings, one row per enrolled photo named by its content hash)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from jaguar.retrieval.local.keypoints import LocalFeatures
from jaguar.retrieval.local.store import LocalFeatureSet
from jaguar.run import RunDir

log = logging.getLogger(__name__)


def load_enrolled_local(run: RunDir) -> Optional[LocalFeatureSet]:
    """The enrolled photos' local features, or None when none were stored."""
    if not run.enrolled_local_path.is_file():
        return None
    return LocalFeatureSet.load(run.enrolled_local_path, "remove it and enrol again (`jaguar enroll` re-extracts "
                                                          "the enrolled photos it can still read)")


def gallery_local_features(run: RunDir, refs: Sequence[str], needed_by: str = "jaguar identify"
                           ) -> list[Optional[LocalFeatures]]:
    """One entry per gallery row (`refs`: "shard:<training file>" or "thumb:<enrolled hash>", as
    Gallery.refs): its local features, None for an enrolled photo without them (enrolled before
    local features were stored, its file gone since; it then counts 0 inliers, with a warning)."""
    from jaguar.retrieval.local.split_features import local_features

    train = local_features(run, "train", needed_by)
    train_position = {name: i for i, name in enumerate(train.names)}
    enrolled = load_enrolled_local(run) if any(ref.startswith("thumb:") for ref in refs) else None
    enrolled_position = {name: i for i, name in enumerate(enrolled.names)} if enrolled is not None else {}
    rows: list[Optional[LocalFeatures]] = []
    missing_train, missing_enrolled = [], 0
    for ref in refs:
        kind, _, key = ref.partition(":")
        if kind == "shard":
            if key not in train_position:
                missing_train.append(key)
                rows.append(None)
            else:
                rows.append(train[train_position[key]])
        else:
            missing_enrolled += key not in enrolled_position
            rows.append(enrolled[enrolled_position[key]] if key in enrolled_position else None)
    if missing_train:
        from jaguar.errors import JaguarError

        raise JaguarError(f"{run.local_features_path('train')} lacks {len(missing_train)} training images of the "
                          f"gallery (e.g. {missing_train[:3]}); re-extract it: `jaguar match {run.path} --split train "
                          f"--force`")
    if missing_enrolled:
        log.warning("%d enrolled photo(s) have no local features in %s: they count 0 inliers; enrol again to add "
                    "them", missing_enrolled, run.enrolled_local_path)
    return rows


def enrolled_local_in_step(run: RunDir, enrolled_names: Sequence[str], photos: dict[str, str],
                           new_names: Sequence[str], new_local: Sequence[LocalFeatures], read_local
                           ) -> LocalFeatureSet:
    """The enrolled local features after an enrolment, one row per enrolled row in `enrolled_names`
    order followed by the new photos (`new_names`, `new_local`): rows already stored are kept, an
    earlier enrolled photo without them (enrolled before they were stored) is re-extracted from its
    recorded path (`photos`: hash -> path) by `read_local(path)` when that file is still there and
    unchanged, else left out (it counts 0 inliers)."""
    import hashlib

    stored = load_enrolled_local(run)
    position = {name: i for i, name in enumerate(stored.names)} if stored is not None else {}
    names, records = [], []
    for name in enrolled_names:
        if name in position:
            names.append(name)
            records.append(stored[position[name]])
            continue
        path = Path(photos.get(name, ""))
        if photos.get(name) and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest()[:32] == name:
            try:
                records.append(read_local(path))
                names.append(name)
                continue
            except (OSError, ValueError) as err:
                log.warning("enrolled photo %s: no local features (%s)", path, err)
        log.warning("enrolled photo %s is no longer readable at %r: it keeps no local features", name, str(path))
    width = stored.descriptors.shape[1] if stored is not None else (new_local[0].descriptor_dim if new_local else 128)
    return LocalFeatureSet.pack(names + list(new_names), records + list(new_local), {"enrolled": True}, width)
