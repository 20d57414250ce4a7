"""Pseudo-labels: unlabelled (test) images whose identity two independent rules agree on, with
enough confidence, become extra training shards labelled with that identity.

Prediction: the identity of the nearest class centroid (cosine; a centroid is the renormalised
mean of an identity's labelled train+val embeddings). Agreement: that identity must also hold a
strict majority of the image's k nearest labelled neighbours. Confidence, compared with the
threshold, is either
- "cosine": the cosine similarity to the predicted centroid (how typical the image is), or
- "margin": that cosine minus the cosine to the second-nearest centroid (how unambiguous it is;
  an image half-way between two identities scores near 0 however close it is to both).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import webdataset

from jaguar.data.manifest import Manifest
from jaguar.data.prep import spool_members, write_split
from jaguar.data.shards import IMAGE_MEMBERS, load_manifest
from jaguar.errors import JaguarError, MissingInputError
from jaguar.formats import read_labels
from jaguar.io import atomic_directory, atomic_write_json
from jaguar.untrusted_names import check_name, resolve_inside
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir

logger = logging.getLogger(__name__)

CONFIDENCE_KINDS = ("cosine", "margin")
_CHUNK = 4096  # candidate rows scored at once: bounds memory for large unlabelled pools


class PseudoLabelError(JaguarError, ValueError):
    """A pseudo-labelling request that cannot be met; the message names the input at fault."""


@dataclass
class PseudoLabel:
    name: str
    label: int  # predicted label, in the labelled features' label space
    identity: str
    confidence: float
    centroid_cosine: float
    knn_votes: int  # how many of the k nearest labelled neighbours carry `label`
    agreed: bool
    selected: bool


def class_centroids(labelled: FeatureSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels C, centroids C×D) over the labelled rows; centroids are unit length."""
    known = labelled.labels >= 0
    embeddings = torch.nn.functional.normalize(labelled.embeddings[known], dim=1)
    labels = labelled.labels[known]
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = torch.zeros(len(classes), embeddings.shape[1]).index_add_(0, inverse, embeddings)
    return classes, torch.nn.functional.normalize(sums, dim=1)


def predict(labelled: FeatureSet, candidates: FeatureSet, threshold: float, k: int = 5,
            confidence: str = "cosine") -> list[PseudoLabel]:
    """Score every candidate; `selected` marks those agreed on with confidence >= threshold."""
    if confidence not in CONFIDENCE_KINDS:
        raise PseudoLabelError(f"confidence {confidence!r} is not one of {', '.join(CONFIDENCE_KINDS)}")
    if k < 1:
        raise PseudoLabelError(f"k (neighbours that must agree) must be >= 1, got {k}")
    known = labelled.labels >= 0
    if int(known.sum()) == 0:
        raise PseudoLabelError("the labelled features have no labels (all -1); use train/val features")
    gallery = torch.nn.functional.normalize(labelled.embeddings[known], dim=1)
    gallery_labels = labelled.labels[known]
    classes, centroids = class_centroids(labelled)
    k = min(k, len(gallery_labels))
    queries = torch.nn.functional.normalize(candidates.embeddings, dim=1)
    results: list[PseudoLabel] = []
    for start in range(0, len(queries), _CHUNK):
        block = queries[start:start + _CHUNK]
        centroid_sims = block @ centroids.T
        top2 = centroid_sims.topk(min(2, len(classes)), dim=1)
        best_sim = top2.values[:, 0]
        # with a single identity there is no runner-up: the margin is measured against cosine -1
        second_sim = top2.values[:, 1] if len(classes) > 1 else torch.full_like(best_sim, -1.0)
        predicted = classes[top2.indices[:, 0]]
        neighbours = (block @ gallery.T).topk(k, dim=1).indices
        votes = (gallery_labels[neighbours] == predicted[:, None]).sum(dim=1)
        score = best_sim if confidence == "cosine" else best_sim - second_sim
        for row in range(len(block)):
            label = int(predicted[row])
            agreed = 2 * int(votes[row]) > k
            value = float(score[row])
            results.append(PseudoLabel(
                name=candidates.names[start + row], label=label,
                identity=labelled.label_names.get(label, str(label)), confidence=value,
                centroid_cosine=float(best_sim[row]), knn_votes=int(votes[row]), agreed=agreed,
                selected=agreed and value >= threshold))
    return results


def selection_precision(predictions: Sequence[PseudoLabel], truth: dict[str, str]) -> dict:
    """How many selected (and, for contrast, all) predictions name the true identity, over the
    images whose truth is known. None, not 0, when nothing can be measured."""
    def measure(items: list[PseudoLabel]) -> dict:
        judged = [p for p in items if p.name in truth]
        correct = sum(p.identity == truth[p.name] for p in judged)
        return {"judged": len(judged), "correct": correct,
                "precision": correct / len(judged) if judged else None}

    selected = measure([p for p in predictions if p.selected])
    everything = measure(list(predictions))
    return {"selected": selected, "all_predictions": everything,
            "unjudged_selected": sum(p.selected and p.name not in truth for p in predictions)}


def concat_feature_sets(sets: Sequence[FeatureSet]) -> FeatureSet:
    """Rows of several feature sets (e.g. train and val) as one; names must not repeat."""
    names = [n for fs in sets for n in fs.names]
    label_names: dict[int, str] = {}
    for fs in sets:
        label_names.update(fs.label_names)
    return FeatureSet(names, torch.cat([fs.normalized().embeddings for fs in sets]),
                      torch.cat([fs.labels for fs in sets]), label_names, {"split": "+".join(
                          str(fs.meta.get("split", "?")) for fs in sets)})


def summary_json(predictions: Sequence[PseudoLabel], threshold: float, k: int, confidence: str,
                 precision: dict | None) -> dict:
    selected = [p for p in predictions if p.selected]
    return {
        "threshold": threshold, "k": k, "confidence": confidence,
        "candidates": len(predictions), "agreed": sum(p.agreed for p in predictions),
        "selected_count": len(selected),
        "selected": [{"filename": p.name, "identity": p.identity, "label": p.label,
                      "confidence": round(p.confidence, 6), "knn_votes": p.knn_votes} for p in selected],
        "precision": precision,
        "rejected": [asdict(p) for p in predictions if not p.selected],
    }


def fine_tune_command(run_dir: str | Path | RunDir, pseudo_dir: str | Path, epochs: int = 3,
                      lr_factor: float = 0.1) -> str:
    """The command that fine-tunes the run on train + pseudo-labelled shards: a few epochs, from the
    run's best checkpoint (if it has one), at a tenth of its learning rate, into a sibling run folder."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg = run.load_config()
    extra = ",".join([*cfg.data.extra_shards, str(pseudo_dir)])
    try:
        init_from = f"train.init_from={run.default_checkpoint()} "
    except MissingInputError:  # features of a pretrained backbone (`jaguar extract --config`): start from it
        init_from = ""
    return (f"jaguar train {run.config_path} data.extra_shards=[{extra}] {init_from}"
            f"optim.lr={cfg.optim.lr * lr_factor:g} optim.warmup_epochs=0 train.epochs={epochs} "
            f"train.resume=none run.dir={run.path.with_name(run.path.name + '-pseudo')}")


def _labelled_features(run: RunDir) -> FeatureSet:
    """The train features and, when extracted, the validation ones. Train features are required:
    with validation alone the centroids would rest on a few images an identity (and on none for an
    identity without validation images), so every test image would be judged against a fraction of
    the labelled set."""
    if not run.has_features("train"):
        have = f" (only {run.features_path('val')} is there)" if run.has_features("val") else ""
        raise MissingInputError(f"run {run} has no {run.features_path('train')}{have}: pseudo-labelling compares "
                                f"test images with the labelled training images; run `jaguar extract {run} "
                                f"--split train` first")
    return concat_feature_sets([run.load_features(split) for split in ("train", "val") if run.has_features(split)])


def _truth(candidates: FeatureSet, test_labels: str | Path | None) -> dict[str, str]:
    """Known test identities: from the CSV when given, else from labels stored with the features."""
    if test_labels:
        return read_labels(test_labels)
    return {name: candidates.label_names.get(label, str(label))
            for name, label in zip(candidates.names, candidates.labels.tolist()) if label >= 0}


def pseudo_label_run(run_dir: str | Path | RunDir, threshold: float, out_dir: str | Path | None = None,
                     k: int = 5, confidence: str = "cosine", test_labels: str | Path | None = None,
                     overwrite: bool = False) -> dict:
    """Select pseudo-labels for the run's test images and write them as a `jaguar prep`-style
    shards folder (split "train", the original label space; default RUN/pseudo) with pseudo.json;
    return the summary."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    out_dir = Path(out_dir) if out_dir else run.pseudo_dir
    cfg = run.load_config()
    if not cfg.data.shards:
        raise PseudoLabelError(f"{run.config_path} names no data.shards; the test images are copied "
                               f"from there")
    manifest = load_manifest(cfg.data.shards)
    candidates = run.load_features("test")
    labelled = _labelled_features(run)
    identities = {str(name): int(label) for name, label in manifest.identities.items()}
    for label, name in labelled.label_names.items():
        if identities.get(name, label) != label:
            raise PseudoLabelError(f"identity {name!r} is label {label} in the run's features but "
                                   f"{identities[name]} in the shards {cfg.data.shards}; re-extract the run")
    predictions = predict(labelled, candidates, threshold, k, confidence)
    truth = _truth(candidates, test_labels)
    precision = selection_precision(predictions, truth) if truth else None
    summary = summary_json(predictions, threshold, k, confidence, precision)
    summary["source_run"] = str(run.path.resolve())
    summary["source_shards"] = str(Path(cfg.data.shards).resolve())
    selected = {p.name: p for p in predictions if p.selected}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_pseudo_shards(Path(cfg.data.shards), manifest, selected, tmp)
        atomic_write_json(tmp / "pseudo.json", summary)
    summary["out_dir"] = str(out_dir)
    logger.info("%d pseudo-labelled images written to %s", len(selected), out_dir)
    return summary


def _raw_samples(shards_dir: Path, manifest: Manifest, wanted: set[str]) -> dict[str, tuple[str, bytes, dict]]:
    """{filename: (key, png bytes exactly as stored, json meta)} for the wanted images, from any split."""
    found: dict[str, tuple[str, bytes, dict]] = {}
    if not wanted:
        return found
    splits = sorted(manifest.splits, key=lambda s: s != "test")  # test images live in "test"
    manifest.check_sizes(shards_dir, splits)
    urls = [str(resolve_inside(shards_dir, shard.url, f"{Manifest.path(shards_dir)} split {split!r} shard"))
            for split in splits for shard in manifest.splits[split].shards]
    # no decoding: the samples' bytes are copied unchanged into the pseudo-label shards
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample.get("json", b"{}"))
        name = meta.get("filename")
        members = {ext: bytes(data) for ext, data in sample.items() if ext in IMAGE_MEMBERS}
        if name in wanted and members:
            key = check_name(sample["__key__"].rsplit("/", 1)[-1], f"sample key in {sample.get('__url__')}")
            found[name] = (key, members, meta)  # the key becomes a tar member name
            if len(found) == len(wanted):
                break
    missing = sorted(wanted - set(found))
    if missing:
        raise PseudoLabelError(f"{len(missing)} selected image(s) are not in the shards {shards_dir}, "
                               f"e.g. {missing[:3]}; were the features extracted from these shards?")
    return found


def write_pseudo_shards(shards_dir: Path, manifest: Manifest, selected: dict[str, PseudoLabel], out_dir: Path,
                        shard_size: int = 500) -> Manifest:
    """Write the selected images (image bytes unchanged, json relabelled with the predicted identity)
    as split "train" of a `jaguar prep`-format folder in out_dir, with the source's identities."""
    from jaguar.data.dedup import carry_groups

    samples = _raw_samples(shards_dir, manifest, set(selected))
    out_dir.mkdir(parents=True, exist_ok=True)
    spool = out_dir / ".spool"  # the layout prep's split writer reads image bytes from
    entries = []
    with spool.open("wb") as handle:
        for name in sorted(selected):
            key, members, meta = samples[name]
            prediction = selected[name]
            meta = dict(meta, identity=prediction.identity, label=prediction.label,
                        pseudo_label={"confidence": prediction.confidence, "knn_votes": prediction.knn_votes,
                                      "original_identity": meta.get("identity")})
            places, digest = spool_members(handle, members)
            entries.append({"key": key, "meta": meta, "spool": places, "sha256": digest})
    split = write_split(out_dir, "train", entries, spool, shard_size)
    spool.unlink()
    # the same label space as the shards trained on; the images keep their source's near-duplicate groups
    out_manifest = Manifest(layout="pseudo-labels", source=str(shards_dir.resolve()),
                            identities=dict(manifest.identities), splits={"train": split},
                            groups=carry_groups(manifest.groups, set(selected), "train"))
    out_manifest.save(out_dir)
    return out_manifest
