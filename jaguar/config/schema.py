"""The groups of a jaguar run's configuration. Each field declares its type (a `Literal` for a choice),
its default and, for numbers with a physical meaning, the range a run accepts (`ranged`), so a value
is checked when the config is loaded, not when the object using it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from jaguar.config.fields import ConfigError, apply_mapping, convert, leaf_keys, ranged, type_hints, unknown_key

_PROBABILITY = "[0, 1]"
_COUNT = "[1, inf)"  # a positive whole number
_OFF_OR_COUNT = "[0, inf)"  # 0 disables
_POSITIVE = "(0, inf)"
_NON_NEGATIVE = "[0, inf)"


class Group:
    """Base of the config groups: every assignment, in a recipe as in the loader, is converted to the
    field's type and checked against its choices and range; a name that is not a key (a typo, an old
    key) is an error rather than a silently ignored attribute."""
    KEY: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        prefix = f"{self.KEY}." if self.KEY else ""
        fld = self.__dataclass_fields__.get(name)  # type: ignore[attr-defined]
        if fld is None:
            raise unknown_key(prefix + name, leaf_keys(type(self), prefix), "")
        ftype = type_hints(type(self))[name]
        if not dataclasses.is_dataclass(ftype):
            value = convert(prefix + name, value, ftype, fld.metadata)
        elif not isinstance(value, ftype):
            raise ConfigError(f"config key '{prefix + name}' is a group ({ftype.__name__}); set its keys")
        object.__setattr__(self, name, value)


@dataclass
class DataConfig(Group):
    KEY = "data"

    shards: str = ""  # a `jaguar prep` output folder
    val_fraction: float = ranged(0.1, "[0, 1)", "1 would leave no training images")
    val_split: Literal["stratified", "identity"] = "stratified"
    # near-duplicate groups (bursts, copies) every split keeps on one side: prep's pHash groups,
    # `jaguar dedup`'s embedding groups, or none
    split_groups: Literal["none", "phash", "embedding"] = "phash"
    alpha_mode: Literal["keep", "black", "random", "blur"] = "keep"
    background: Literal["noise", "solid", "patch", "mixed"] = "mixed"  # for alpha_mode=random
    crop_to_alpha: bool = False  # crop to the mask's bounding box before resizing
    crop_margin: float = ranged(0.05, "[0, 1]")  # fraction of the bounding box added on each side
    resize: Literal["pad", "stretch"] = "pad"  # pad (keep aspect, pad) | stretch
    sampler: Literal["pk", "shuffle"] = "pk"
    p_identities: int = ranged(8, _COUNT)  # P in a PK batch (per process)
    k_images: int = ranged(4, _COUNT)  # K in a PK batch
    batch_size: int = ranged(32, _COUNT)  # micro-batch per process for sampler=shuffle and for extraction
    num_workers: int = ranged(2, _NON_NEGATIVE)
    hflip: float = ranged(0.5, _PROBABILITY)
    rotation: float = ranged(0.0, "[0, 180]")  # degrees, uniform in [-r, r]
    scale: list[float] = ranged([1.0, 1.0], _POSITIVE, length=2, repeat=True)  # [min, max] zoom
    translate: float = ranged(0.0, "[0, 1]")  # fraction of the size
    color_jitter: float = ranged(0.0, "[0, 1]")  # brightness/contrast/saturation factor in [1-j, 1+j]
    random_erasing: float = ranged(0.0, _PROBABILITY)
    pad: int = ranged(0, _NON_NEGATIVE)  # pixels of padding before a random crop back to size (BoT)
    mixup_alpha: float = ranged(0.0, _NON_NEGATIVE)  # Beta(a, a); 0 disables mixup
    mixup_prob: float = ranged(0.0, _PROBABILITY)
    extra_shards: list[str] = field(default_factory=list)  # e.g. pseudo-labelled shards


@dataclass
class ModelConfig(Group):
    KEY = "model"

    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: str = ""  # local weights file; works offline
    # network input [height, width]; one number is a square
    img_size: list[int] = ranged([224, 224], "[16, inf)", "below 16 px the backbone's strides leave no "
                                 "feature map", length=2, repeat=True)
    pooling: Literal["gem", "avg", "max", "avgmax", "cls"] = "gem"
    gem_p: float = ranged(3.0, "[1, 8]", "below 1 GeM favours the weakest responses; above 8 it is close to "
                          "max pooling: use model.pooling=max")
    gem_learnable: bool = True
    neck: Literal["bnneck", "none"] = "bnneck"
    reduce_dim: int = ranged(0, _OFF_OR_COUNT)  # linear reduction before the neck; 0 keeps the backbone width
    dropout: float = ranged(0.0, "[0, 1)", "1 would drop every feature")
    last_stride: Literal[1, 2] = 2  # 1 for the BoT ResNet
    grad_checkpointing: bool = False
    head: Literal["arcface", "subcenter_arcface", "cosface", "softmax"] = "arcface"
    head_scale: float = ranged(30.0, _POSITIVE)  # s: logits are s * cos
    head_margin: float = ranged(0.5, _NON_NEGATIVE)  # m; ArcFace also needs m < pi/2
    subcenters: int = ranged(3, _COUNT)
    easy_margin: bool = False


@dataclass
class LossConfig(Group):
    KEY = "loss"

    ce_weight: float = ranged(1.0, _NON_NEGATIVE)
    label_smoothing: float = ranged(0.0, "[0, 1)", "1 would make every target uniform")
    triplet_weight: float = ranged(0.0, _NON_NEGATIVE)
    triplet_margin: float = ranged(0.3, _NON_NEGATIVE)  # 0 = soft margin
    center_weight: float = ranged(0.0, _NON_NEGATIVE)
    center_lr: float = ranged(0.5, _POSITIVE)  # the centres' own SGD


@dataclass
class DistillConfig(Group):
    """Knowledge distillation from a teacher run's embeddings of the training images (precomputed:
    `jaguar extract TEACHER --split train`, and `--split val` when the student trains on images the
    teacher held out), added to the loss terms above (jaguar.models.losses)."""
    KEY = "distill"

    teacher: str = ""  # the teacher's run folder; "" trains without distillation
    weight: float = ranged(1.0, _NON_NEGATIVE)
    # similarity: the batch's cosine-similarity matrices made to match (any widths); cosine: each
    # embedding made to point where the teacher's does (needs the teacher's width: model.reduce_dim)
    loss: Literal["similarity", "cosine"] = "similarity"


@dataclass
class OptimConfig(Group):
    KEY = "optim"

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = ranged(3e-4, _POSITIVE)
    weight_decay: float = ranged(0.05, _NON_NEGATIVE)
    momentum: float = ranged(0.9, "[0, 1)")  # sgd
    betas: list[float] = ranged([0.9, 0.999], "[0, 1)", length=2)  # adam, adamw
    layer_decay: float = ranged(0.0, "[0, 1]")  # 0 disables layer-wise LR decay (ViTs)
    head_lr_mult: float = ranged(1.0, _POSITIVE)
    scheduler: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = ranged(0.0, _NON_NEGATIVE)
    warmup_lr: float = ranged(0.0, _NON_NEGATIVE)  # LR at the start of warmup
    min_lr: float = ranged(0.0, _NON_NEGATIVE)  # cosine's final LR, at most optim.lr
    milestones: list[float] = ranged([], _NON_NEGATIVE)  # increasing epochs, for multistep
    gamma: float = ranged(0.1, "(0, 1]")  # multistep's LR factor at each milestone
    grad_clip: float = ranged(0.0, _NON_NEGATIVE)  # 0 disables clipping
    ema: bool = False
    ema_decay: float = ranged(0.999, "(0, 1)")


@dataclass
class TrainConfig(Group):
    KEY = "train"

    epochs: int = ranged(10, _COUNT)
    max_steps: int = ranged(0, _OFF_OR_COUNT)  # optimizer steps; 0 = no cap
    grad_accum: int = ranged(1, _COUNT)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_every: int = ranged(1, _OFF_OR_COUNT)  # epochs; 0 disables validation
    # optimizer steps; 0 = at the end, and at an epoch's end once 100 steps have passed since the last one
    checkpoint_every: int = ranged(0, _OFF_OR_COUNT)
    keep_last: int = ranged(2, _OFF_OR_COUNT)  # step checkpoints kept; 0 keeps all
    resume: str = "auto"  # auto | none | a checkpoint folder
    max_bad_steps: int = ranged(20, _NON_NEGATIVE)  # stop after more skipped non-finite updates in a row
    log_every: int = ranged(10, _COUNT)  # optimizer steps
    deepspeed_config: str = ""  # DeepSpeed JSON, when not given by `accelerate launch`
    init_from: str = ""  # weights to start from (a checkpoint folder), e.g. to fine-tune on pseudo-labels


@dataclass
class PostConfig(Group):
    """Post-processing of a search: query expansion, DBA, k-reciprocal re-ranking and its blend.
    The group `retrieval.post` of a config, and the settings tune-post chooses (RunDir.load_post)."""
    KEY = "retrieval.post"

    qe_k: int = ranged(0, _OFF_OR_COUNT)  # top-k query expansion; 0 disables
    qe_alpha: float = ranged(0.0, _NON_NEGATIVE)  # alpha-weighted QE exponent; 0 = plain average
    dba_k: int = ranged(0, _OFF_OR_COUNT)  # database-side augmentation; 0 disables
    rerank: bool = False
    k1: int = ranged(20, _COUNT)
    k2: int = ranged(6, _COUNT)
    lambda_value: float = ranged(0.3, "[0, 1]")  # weight of the original distance in the re-ranked one
    blend: float = ranged(1.0, "[0, 1]")  # w in final = (1 - w) * raw + w * reranked; used only with rerank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def active(self) -> dict[str, Any]:
        """Only the settings that act: QE / DBA with a k above 1 (k = 1 averages an image with
        itself), their alpha when either acts, re-ranking's k1, k2, lambda and blend when it is
        on. {} is plain cosine similarity."""
        settings: dict[str, Any] = {}
        if self.qe_k > 1:
            settings["qe_k"] = self.qe_k
        if self.dba_k > 1:
            settings["dba_k"] = self.dba_k
        if settings and self.qe_alpha:
            settings["qe_alpha"] = self.qe_alpha
        if self.rerank:
            settings.update(rerank=True, k1=self.k1, k2=self.k2, lambda_value=self.lambda_value, blend=self.blend)
        return settings

    def describe(self) -> str:
        """The steps that act, named as the field names them, e.g. "QE+DBA (k 2 / 3, alpha 3) +
        re-ranking (k1 20, k2 6, lambda 0.3, blend 0.5)"; "cosine similarity" when none does."""
        active = self.active()
        expansions = [name for name, key in (("QE", "qe_k"), ("DBA", "dba_k")) if key in active]
        steps = []
        if expansions:
            ks = " / ".join(str(active[key]) for key in ("qe_k", "dba_k") if key in active)
            alpha = f", alpha {active['qe_alpha']:g}" if "qe_alpha" in active else ""
            steps.append(f"{'+'.join(expansions)} (k {ks}{alpha})")
        if self.rerank:
            steps.append(f"re-ranking (k1 {self.k1}, k2 {self.k2}, lambda {self.lambda_value:g}, "
                         f"blend {self.blend:g})")
        return " + ".join(steps) or "cosine similarity"

    @classmethod
    def from_dict(cls, mapping: dict[str, Any], where: str = "") -> "PostConfig":
        """Settings from a mapping (e.g. tune-post's saved "chosen"), checked as the config checks them;
        raises ConfigError naming the key."""
        post = cls()
        apply_mapping(post, mapping, where, "retrieval.post.")
        return post


@dataclass
class LocalConfig(Group):
    """Local pattern evidence (jaguar.retrieval.local): keypoints on the animal's coat, matched between
    each query and its global shortlist with geometric verification. The group `retrieval.local`."""
    KEY = "retrieval.local"

    # rootsift: OpenCV SIFT + RootSIFT (no weights, any CPU); disk: kornia's DISK (weights_file needed)
    extractor: Literal["rootsift", "disk"] = "rootsift"
    weights_file: str = ""  # a learned extractor's local weights file (.pth / .safetensors); never downloaded
    max_keypoints: int = ranged(1024, _COUNT)  # the strongest kept per image
    # longest image side (pixels) the extractor works at; larger images are shrunk, coordinates mapped back; 0 keeps
    max_side: int = ranged(512, _OFF_OR_COUNT)
    mask_erode: int = ranged(2, _NON_NEGATIVE)  # pixels the alpha mask is eroded by before detection
    contrast_threshold: float = ranged(0.02, _POSITIVE)  # SIFT's contrastThreshold (OpenCV default 0.04)
    # Lowe's ratio test: the largest nearest / second-nearest descriptor distance kept; 1 disables it
    ratio: float = ranged(0.9, "(0, 1]")
    mutual: bool = True  # keep only mutual nearest neighbours
    # tentative correspondences: nearest (descriptor nearest neighbours, ratio, mutual) or lightglue
    # (kornia's LightGlue for the extractor's descriptors; matcher_weights_file needed)
    matcher: Literal["nearest", "lightglue"] = "nearest"
    matcher_weights_file: str = ""  # LightGlue's local weights file; never downloaded
    # geometric model of verification, none admitting a reflection: similarity (RANSAC), affine or
    # homography (MAGSAC++ where OpenCV has it)
    geometry: Literal["similarity", "affine", "homography"] = "affine"
    ransac_threshold: float = ranged(0.02, "(0, 1]")  # inlier reprojection error, a fraction of the longest image side
    # `jaguar match`: each image is matched against this many other images of its split, its top by the
    # global (raw cosine) similarity (clipped to the split's size less one); cost grows as N x shortlist
    shortlist: int = ranged(50, _COUNT)
    keep_best: int = ranged(5, _COUNT)  # candidates a query keeps the verified correspondences of (to draw)


@dataclass
class RetrievalConfig(Group):
    KEY = "retrieval"

    flip_tta: bool = True
    scales: list[float] = ranged([1.0], _POSITIVE)  # test-time input scales, averaged
    post: PostConfig = field(default_factory=PostConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    tune: bool = True  # choose the post-processing on the validation split
    # tune-post adopts a stage (QE, re-ranking) only when its validation gain exceeds this many
    # standard errors of the paired per-identity AP differences; 0 adopts any gain
    tune_min_gain_se: float = ranged(1.0, _NON_NEGATIVE)
    # dense: N x N scores; topm: each query's top_m neighbour lists, never N x N (large galleries);
    # auto: topm when the searched set has more than topm_above images
    mode: Literal["auto", "dense", "topm"] = "auto"
    topm_above: int = ranged(5000, _COUNT)
    top_m: int = ranged(100, _COUNT)


@dataclass
class RunConfig(Group):
    KEY = "run"

    dir: str = "runs/default"
    seed: int = ranged(0, "[0, 4294967295]", "numpy seeds are 32-bit")
    name: str = ""


@dataclass
class Config(Group):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    run: RunConfig = field(default_factory=RunConfig)
