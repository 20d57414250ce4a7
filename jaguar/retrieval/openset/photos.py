"""Embedding new photos (camera-trap crops, RGBA with a mask or plain RGB/JPEG) with a trained run's
model, preprocessed exactly as its gallery was: each photo goes through `jaguar prep`'s own
conversion (jaguar.data.prep.convert_image: every image form, EXIF orientation, the long-side limit
and encoding the shards were made with) and the shard decoder, then the run's eval transform and
the extraction's flip / multi-scale averaging (jaguar.core.embedding.embed_batches). So a photo
that is also in the shards gets the embedding `jaguar extract` gave it.

`list_photos` expands folders; `PhotoEmbedder.embed` returns the embeddings of the readable photos
and a `PhotoProblem` naming each unreadable one, so one bad file never stops the rest."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from jaguar.config import Config
from jaguar.data.image_forms import IMAGE_SUFFIXES
from jaguar.data.manifest import Manifest
from jaguar.data.prep import convert_image
from jaguar.data.shards import decode_rgba, load_manifest
from jaguar.data.transforms import build_eval_transform
from jaguar.errors import JaguarError
from jaguar.core.embedding import load_embedder
from jaguar.core.embedding import embed_batches
from jaguar.run import RunDir

THUMBNAIL_SIDE = 192  # pixels, long side of the thumbnails kept for review pages
REVIEW_SIDE = 512  # pixels, long side of the picture a review page draws correspondences on


class PhotoError(JaguarError, ValueError):
    """No photo could be used (none given, empty folders, all unreadable); the message names them."""


@dataclass
class PhotoProblem:
    path: Path
    reason: str


@dataclass
class EmbeddedPhotos:
    """The readable photos in the order given, their L2-normalised embeddings (N x D float32),
    their thumbnails (PNG bytes, long side THUMBNAIL_SIDE) and content hashes (sha256, hex); with a
    local extractor, each photo's local features (in its pixels, as converted by prep) and a
    larger picture (PNG, long side REVIEW_SIDE) to draw correspondences on, else empty lists."""
    paths: list[Path]
    embeddings: torch.Tensor
    thumbnails: list[bytes]
    hashes: list[str]
    problems: list[PhotoProblem]
    local: list = field(default_factory=list)  # LocalFeatures
    pictures: list[bytes] = field(default_factory=list)


def list_photos(items: Sequence[str | Path]) -> tuple[list[Path], list[PhotoProblem]]:
    """The photo files named by `items` (files, or folders searched recursively for IMAGE_SUFFIXES,
    sorted), and a problem for each item that is missing or an empty folder."""
    photos: list[Path] = []
    problems: list[PhotoProblem] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(PhotoProblem(path, f"folder holds no photos ({', '.join(IMAGE_SUFFIXES)})"))
            photos += found
        elif path.is_file():
            photos.append(path)
        else:
            problems.append(PhotoProblem(path, "does not exist"))
    return photos, problems


def _thumbnail(rgba, side: int = THUMBNAIL_SIDE) -> bytes:
    image = Image.fromarray(rgba, "RGBA")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class PhotoEmbedder:
    """The run's model (its extraction checkpoint: best, else the newest; or `checkpoint`; the
    pretrained backbone of a zero-shot run) on CPU
    or the first GPU, or an exported model (`onnx_path`, run by onnxruntime on the CPU, its
    preprocessing from its metadata; no checkpoint read), with the prep settings of the run's shards.
    local_extractor: a jaguar.retrieval.local extractor run on each photo's RGBA as read here (the
    photo is read once for both), or None."""

    def __init__(self, run: RunDir, checkpoint: str | Path | None = None, batch_size: int = 16,
                 onnx_path: str | Path | None = None, local_extractor=None) -> None:
        self.local_extractor = local_extractor
        cfg: Config = run.load_config()
        self.device = torch.device("cuda" if torch.cuda.is_available() and onnx_path is None else "cpu")
        if onnx_path is not None:
            if checkpoint:
                raise JaguarError("--checkpoint and --model both name the weights; give one of them")
            from jaguar.core.onnx_model import OnnxEmbedding

            onnx_model = OnnxEmbedding.load(onnx_path)
            cfg, weights = onnx_model.eval_config(cfg), None
        else:
            onnx_model, weights = None, Path(checkpoint) if checkpoint else run.extraction_weights()
        self.cfg = cfg
        self.model = load_embedder(cfg, weights, onnx_model, self.device)
        self.source = self.model.source
        self.transform = build_eval_transform(self.cfg, self.model.mean, self.model.std)
        self.batch_size = batch_size
        try:
            manifest: Optional[Manifest] = load_manifest(self.cfg.data.shards)
        except (OSError, JaguarError, ValueError):
            manifest = None
        options = manifest.options if manifest is not None else {}
        if not options and onnx_model is not None:  # no shards (a laptop): the prep settings of the export
            options = dict(onnx_model.meta.get("prep", {}))
        # prep's defaults when the shards are gone: the values `jaguar prep` uses unless told otherwise
        self.max_side = int(options.get("max_side", 1024))
        self.encoding = str(options.get("encoding", "png"))

    def read_rgba(self, path: Path) -> tuple[object, dict]:
        """(H x W x 4 uint8 RGBA, prep's result) of a photo as `jaguar prep` would store it; PhotoError
        when prep cannot convert it."""
        result = convert_image(str(path), False, self.max_side, self.encoding)
        if "error" in result:
            raise PhotoError(result["error"])
        return decode_rgba({f".{name}": data for name, data in result["members"].items()}, str(path)), result

    def _prepare(self, path: Path) -> tuple[torch.Tensor, bytes, str, object, bytes]:
        rgba, result = self.read_rgba(path)
        image = self.transform(rgba, {"alpha_bbox": result["alpha_bbox"]})
        local, picture = None, b""
        if self.local_extractor is not None:
            local, picture = self.local_extractor.extract(rgba), _thumbnail(rgba, REVIEW_SIDE)
        return image, _thumbnail(rgba), hashlib.sha256(path.read_bytes()).hexdigest()[:32], local, picture

    def embed(self, photos: Sequence[Path]) -> EmbeddedPhotos:
        """Embed `photos`; an unreadable one becomes a PhotoProblem (file and reason), the rest go on."""
        tensors, kept, thumbs, hashes, problems, local, pictures = [], [], [], [], [], [], []
        for path in photos:
            try:
                image, thumb, digest, features, picture = self._prepare(Path(path))
            except (PhotoError, OSError, JaguarError) as err:
                problems.append(PhotoProblem(Path(path), str(err)))
                continue
            tensors.append(image)
            kept.append(Path(path))
            thumbs.append(thumb)
            hashes.append(digest)
            if features is not None:
                local.append(features)
                pictures.append(picture)
        batches = [(torch.stack(tensors[i:i + self.batch_size]), list(range(i, min(i + self.batch_size, len(tensors)))))
                   for i in range(0, len(tensors), self.batch_size)]
        # the autocast extraction uses (extract_split): bf16 on a GPU that has it, else fp32
        autocast = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        _, embeddings = embed_batches(self.model.embed, batches, self.device, self.model.flip_tta,
                                      self.model.scales, autocast, desc="embed photos",
                                      size_multiple=self.model.size_multiple)
        if embeddings.numel() == 0:
            embeddings = torch.zeros(0, self.model.embed_dim)
        return EmbeddedPhotos(kept, embeddings, thumbs, hashes, problems, local, pictures)


def require_photos(items: Sequence[str | Path]) -> tuple[list[Path], list[PhotoProblem]]:
    """list_photos, raising PhotoError naming every item when no photo at all was found."""
    if not items:
        raise PhotoError("no photos given; name photo files or folders of photos")
    photos, problems = list_photos(items)
    if not photos:
        raise PhotoError("no photos found: " + "; ".join(f"{p.path}: {p.reason}" for p in problems))
    return photos, problems
