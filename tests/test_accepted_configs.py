"""Configurations the config accepts work, or are refused before any work with the key named:
parameters without a gradient under DDP, EMA and uneven validation under ZeRO-3, DeepSpeed's
clipping, resume with a changed config, multi-scale TTA on ViTs, per-rank randomness, zero-shot runs,
calibration leaks, trained runs without their pretrained file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaguar.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
ZERO3_JSON = str(ROOT / "launch" / "deepspeed" / "zero3.json")


def _env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _accelerate(config: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)


def _vit(shards_dir: Path, run: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards_dir}", f"run.dir={run}", "model.backbone=test_vit", "model.img_size=[32,32]",
            "data.p_identities=2", "data.k_images=2", "data.num_workers=0", "data.val_fraction=0.2",
            "train.log_every=1", *extra]


# ---------------------------------------------------------------- 1. parameters without a gradient


def test_layers_forward_features_skips_are_dropped_and_every_parameter_is_trained():
    from jaguar.core.weights import load_weights
    from jaguar.models import ReIDCriterion, build_model
    from jaguar.train.optim import parameters_without_gradient

    cfg = load_config(None, ["model.backbone=mobilenetv3_small_050", "model.img_size=[64,64]",
                             "loss.triplet_weight=1"])
    model = build_model(cfg, 3)
    # MobileNetV3's conv_head (1x1 conv after pooling) belongs to timm's classifier path only
    assert model.backbone.dropped == ["conv_head"]
    assert not any(name.startswith("backbone.net.conv_head") for name in model.state_dict())
    criterion = ReIDCriterion(cfg, 3, model.embed_dim)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 1])
    criterion(model(images), labels)["loss"].backward()
    assert parameters_without_gradient(model) == []
    # a checkpoint saved while the layer was kept still loads (its tensors are ignored)
    old = dict(model.state_dict(), **{"backbone.net.conv_head.weight": torch.zeros(1024, 288, 1, 1)})
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"old-mobilenet-{os.getpid()}.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, str(path))
    try:
        load_weights(build_model(cfg, 3), path)
    finally:
        path.unlink()


def test_triplet_only_freezes_the_head_and_bnneck_scale_and_trains_the_rest():
    from jaguar.models import ReIDCriterion, build_model
    from jaguar.train.optim import parameters_without_gradient

    cfg = load_config(None, ["model.backbone=test_vit", "model.img_size=[32,32]", "loss.ce_weight=0",
                             "loss.triplet_weight=1"])
    model = build_model(cfg, 3)
    assert not model.head.weight.requires_grad and not model.neck.bnneck.weight.requires_grad
    # the ViT's own tokens are read by forward_features, which is no module forward (ZeRO-3 must know)
    assert ("", "net.pos_embed") in model.backbone.external_params
    criterion = ReIDCriterion(cfg, 3, model.embed_dim)
    criterion(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 0, 1, 1]))["loss"].backward()
    assert parameters_without_gradient(model) == []
    assert model.backbone.net.patch_embed.proj.weight.grad is not None


# One process of a 2-process DDP run (gloo): triplet loss only and dropout, two optimizer steps and
# validation of an odd number of images in batches of 1 (so the ranks' shares differ).
_DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import jaguar.train.trainer as trainer_module
    from jaguar.config import load_config
    shards, run, out = sys.argv[1:4]
    built = {}
    build = trainer_module.build_model
    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        built["init"] = sum(float(p.double().sum()) for p in model.parameters())
        return model
    trainer_module.build_model = recording_build
    cfg = load_config(None, sys.argv[4:])
    trainer = trainer_module.Trainer(cfg)
    acc = trainer.accelerator
    mask = (torch.nn.functional.dropout(torch.ones(4096), 0.5) > 0).tolist()
    metrics = trainer.train()
    with open(f"{out}.{acc.process_index}.json", "w") as handle:
        json.dump({"init": built["init"], "mask": mask, "metrics": metrics,
                   "checksum": sum(float(p.detach().double().sum()) for p in trainer.accelerator.unwrap_model(trainer.model).parameters())}, handle)
    from jaguar.core.accelerator import end_process_group
    end_process_group()
""")


@pytest.mark.slow
def test_two_process_ddp_with_triplet_only_trains_and_draws_dropout_per_rank(shards_dir, tmp_path):
    script = tmp_path / "ddp_script.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "ddp"
    run = tmp_path / "run"
    result = _accelerate("cpu_2proc.yaml", str(script), str(shards_dir), str(run), str(out),
                         *_vit(shards_dir, run, "loss.ce_weight=0", "loss.triplet_weight=1", "model.dropout=0.5",
                               "train.epochs=1", "train.eval_every=1", "data.batch_size=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    # the replicas are initialised alike (before DDP's broadcast), stay in step over both updates
    assert reports[0]["init"] == reports[1]["init"]
    assert reports[0]["metrics"]["steps"] >= 2 and reports[0]["checksum"] == reports[1]["checksum"]
    assert reports[0]["metrics"]["history"], "validation did not run"
    # ...and draw their own dropout masks: independent masks agree on about half the positions
    agreement = np.mean(np.array(reports[0]["mask"]) == np.array(reports[1]["mask"]))
    assert 0.4 < agreement < 0.6, agreement


def test_rank_streams_differ_between_ranks_and_seeds():
    from jaguar.train.seeding import rank_stream_seed

    seeds = {rank_stream_seed(seed, rank) for seed in range(3) for rank in range(4)}
    assert len(seeds) == 12
    assert rank_stream_seed(0, 1) == rank_stream_seed(0, 1)


# ---------------------------------------------------------------- 2, 3, 5. DeepSpeed


def test_ema_under_zero3_is_refused_when_the_config_is_loaded(tmp_path, monkeypatch):
    from jaguar.train.trainer import Trainer

    with pytest.raises(ConfigError, match=r"optim.ema=true cannot be used with DeepSpeed ZeRO-3.*zero3.json"):
        load_config(None, ["optim.ema=true", f"train.deepspeed_config={ZERO3_JSON}"])
    # through `accelerate launch`'s environment: refused before anything is built or written
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ZERO3_JSON)
    cfg = load_config(None, ["optim.ema=true", f"run.dir={tmp_path / 'run'}", "data.shards=/nonexistent"])
    with pytest.raises(ConfigError, match="optim.ema"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stated", ["auto", 1.0])
@pytest.mark.parametrize("grad_clip", [0.0, 2.5])
def test_deepspeed_clipping_follows_grad_clip_whatever_the_json_says(stated, grad_clip, tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    from jaguar.core.accelerator import follow_grad_clip

    config = json.loads((ROOT / "launch" / "deepspeed" / "zero2.json").read_text())
    config["gradient_clipping"] = stated
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))  # as build_accelerator makes it for train.deepspeed_config
    follow_grad_clip(plugin.deepspeed_config, grad_clip)
    assert plugin.deepspeed_config["gradient_clipping"] == grad_clip  # 0 turns DeepSpeed's clipping off


# ZeRO-3 on 2 CPU processes through the launcher's environment: the engine clips as optim.grad_clip
# says (0: off), and validation of an odd number of images in batches of 1 keeps the ranks in step.
_ZERO3_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaguar.config import load_config
    from jaguar.train.trainer import Trainer
    out = sys.argv[1]
    trainer = Trainer(load_config(None, sys.argv[2:]))
    clipping = trainer.model.gradient_clipping()
    metrics = trainer.train()
    with open(f"{out}.{trainer.accelerator.process_index}.json", "w") as handle:
        json.dump({"clipping": clipping, "metrics": metrics, "val": len(trainer.run_split.val_indices)}, handle)
    from jaguar.core.accelerator import end_process_group
    end_process_group()
""")


@pytest.mark.slow
def test_zero3_validates_uneven_shares_and_clips_as_configured(shards_dir, tmp_path):
    script = tmp_path / "zero3_script.py"
    script.write_text(_ZERO3_SCRIPT)
    out, run = tmp_path / "z3", tmp_path / "run"
    result = _accelerate("cpu_2proc_zero3.yaml", str(script), str(out),
                         *_vit(shards_dir, run, "train.epochs=1", "train.eval_every=1",
                               "data.batch_size=1", "optim.grad_clip=0", "data.val_fraction=0.25"))  # 17 val images
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    assert reports[0]["val"] % 2 == 1, "the test needs an odd number of validation images"
    assert [r["clipping"] for r in reports] == [0.0, 0.0]
    assert reports[0]["metrics"]["history"][0]["mAP_balanced"] == reports[1]["metrics"]["history"][0]["mAP_balanced"]


# ---------------------------------------------------------------- 4. resume with a changed config


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaguar.cli.main", "train", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=600)


def test_resume_applies_a_changed_schedule_knowingly_and_refuses_a_changed_model(shards_dir, tmp_path):
    from jaguar.core.weights import read_state
    from jaguar.run import RunDir
    from jaguar.run_checkpoints import CheckpointFolder
    from jaguar.train.trainer import Trainer

    run = RunDir(tmp_path / "run")
    base = _vit(shards_dir, run.path, "train.eval_every=0", "optim.scheduler=constant")
    first = _train(TINY, *base, "optim.lr=1e-3", "train.epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    # a few steps an epoch: no checkpoint at the first epoch's end, only the final one (item 12)
    (final,) = CheckpointFolder(run.checkpoints_dir).steps()
    step = read_state(final)["step"]
    assert read_state(final)["steps_per_epoch"] * 2 == step
    # a changed model cannot continue this checkpoint: refused, naming the key and both values, nothing written
    recorded = run.config_path.read_text()
    with pytest.raises(ConfigError, match=r"model.dropout: 0.0 -> 0.5"):
        Trainer(load_config(TINY, [*base, "optim.lr=1e-3", "train.epochs=2", "model.dropout=0.5"]))
    assert run.config_path.read_text() == recorded
    # a changed schedule is applied from the resumed step on, and the config that ran is kept
    second = _train(TINY, *base, "optim.lr=1e-2", "train.epochs=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "changed schedule (optim.lr: 0.001 -> 0.01, train.epochs: 2 -> 3)" in second.stderr
    assert load_config(run.config_history_path(step)).optim.lr == 1e-3
    assert run.load_config().optim.lr == 1e-2 and run.load_config().train.epochs == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tb_dir))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.startswith("train/lr/backbone"))
    lrs = {e.step: e.value for e in events.Scalars(tag)}
    assert lrs[step] == pytest.approx(1e-3) and lrs[step + 1] == pytest.approx(1e-2)


# ---------------------------------------------------------------- 6. multi-scale TTA on ViTs


def test_multi_scale_tta_on_a_vit_rounds_to_the_patch_size_and_relative_position_vits_are_refused(shards_dir):
    from jaguar.core.embedding import load_embedder
    from jaguar.core.embedding import embed_batch, scaled_size

    assert scaled_size(64, 96, 0.7, 16) == (48, 64) and scaled_size(80, 160, 0.9, 1) == (72, 144)
    cfg = load_config(None, ["model.backbone=test_vit", "model.img_size=[64,64]", "retrieval.scales=[0.7,0.9,1.0]"])
    model = load_embedder(cfg, None, None, torch.device("cpu"))
    assert model.size_multiple == 16
    embedding = embed_batch(model.embed, torch.randn(2, 3, 64, 64), torch.device("cpu"),
                            scales=model.scales, size_multiple=model.size_multiple)
    assert embedding.shape == (2, model.embed_dim) and torch.isfinite(embedding).all()
    relpos = load_config(None, ["model.backbone=test_vit_relpos", "model.img_size=[64,64]",
                                "retrieval.scales=[0.9,1.0]"])
    with pytest.raises(ConfigError, match=r"retrieval.scales=\[0.9, 1.0\].*test_vit_relpos"):
        load_embedder(relpos, None, None, torch.device("cpu"))


# ---------------------------------------------------------------- 9, 10, 11. zero-shot and trained runs


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    net = timm.create_model("resnet10t")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_zero_shot_run_is_a_run_for_every_stage(shards_dir, synth_dir, pretrained_file, tmp_path):
    from jaguar.cli.main import main
    from jaguar.run import RunDir

    run = RunDir(tmp_path / "zero")
    overrides = [f"data.shards={shards_dir}", f"run.dir={run.path}", f"model.pretrained_file={pretrained_file}",
                 "model.img_size=[48,96]", "data.val_fraction=0.3"]
    assert main(["extract", "--config", TINY, *overrides, "--split", "val"]) == 0
    assert main(["calibrate", str(run.path)]) == 0
    # the gallery leaves out the validation images (no query meets itself); the JSON is strict
    train, val = run.load_features("train"), run.load_features("val")
    assert not set(train.names) & set(val.names)
    json.loads(run.calibration_path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    photo = synth_dir / "test" / sorted(os.listdir(synth_dir / "test"))[0]
    assert main(["identify", str(run.path), str(photo), "-o", str(tmp_path / "identify.csv")]) == 0
    assert main(["enroll", str(run.path), "--name", "Newcomer", str(photo)]) == 0
    assert main(["extract", str(run.path), "--split", "test"]) == 0
    assert main(["tune-post", str(run.path)]) == 0
    assert main(["submit", str(run.path), "--test-csv", str(synth_dir / "test.csv")]) == 0
    assert main(["score", str(run.path), "--test-csv", str(synth_dir / "test.csv"),
                 "--labels", str(synth_dir / "test_labels.csv")]) == 0
    assert main(["report", str(run.path)]) == 0
    assert (run.report_dir / "index.html").is_file()


def test_calibration_refuses_queries_that_are_in_the_gallery_and_never_writes_nan(tmp_path):
    from jaguar.retrieval.openset.calibrate import CalibrationError, calibrate_features
    from jaguar.core.features import FeatureSet
    from jaguar.run import OpenSetCalibration, OpenSetFigures, RunDir

    generator = torch.Generator().manual_seed(0)
    names = [f"img{i}.png" for i in range(12)]
    embeddings = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=1)
    labels = torch.arange(12) % 4
    train = FeatureSet(names, embeddings, labels, {i: f"cat{i}" for i in range(4)})
    leaked = FeatureSet(names[:4], embeddings[:4], labels[:4], {i: f"cat{i}" for i in range(4)})
    with pytest.raises(CalibrationError, match=r"4 validation images are also in the training features.*img0.png"):
        calibrate_features(train, leaked)
    nan = OpenSetCalibration(**{**_calibration_fields(), "fold_balanced": [float("nan")]})
    with pytest.raises(ValueError):
        RunDir(tmp_path).save_calibration(nan)
    assert not RunDir(tmp_path).calibration_path.exists()


def _calibration_fields() -> dict:
    from jaguar.run import OpenSetFigures

    return dict(figures=OpenSetFigures(threshold=0.5, known_accuracy=1.0, unknown_accuracy=1.0, balanced_accuracy=1.0,
                                       geometric_mean=1.0, known_rank1=1.0, num_known=1, num_unknown=1),
                aggregate="max", folds=2, fold_balanced=[1.0], curve={}, aggregates={}, held_out_groups="", features="")


def test_a_trained_run_needs_no_pretrained_file_and_takes_search_overrides_only(shards_dir, pretrained_file, tmp_path):
    from jaguar.models import build_model
    from jaguar.retrieval.extract import resolve_source
    from jaguar.run import RunDir

    moved = tmp_path / "gone.safetensors"
    moved.write_bytes(pretrained_file.read_bytes())
    cfg = load_config(TINY, [f"data.shards={shards_dir}", f"run.dir={tmp_path / 'run'}", "model.img_size=[48,96]",
                             f"model.pretrained_file={moved}"])
    weights = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg, 1).state_dict().items()}, str(weights))
    run = RunDir(cfg.run.dir)
    run.save_config(cfg)
    moved.unlink()  # the run's weights are in its checkpoint
    _, resolved, checkpoint = resolve_source(run, overrides=["retrieval.scales=[0.9,1.0]", "data.batch_size=8"],
                                             checkpoint=weights)
    assert resolved.retrieval.scales == [0.9, 1.0] and resolved.data.batch_size == 8
    from jaguar.retrieval.extract import extract_split

    extract_split(run, "test", resolved, checkpoint)
    assert run.load_features("test").meta["scales"] == [0.9, 1.0]
    with pytest.raises(ConfigError, match=r"model.backbone is fixed by the run's weights"):
        resolve_source(run, overrides=["model.backbone=resnet18"], checkpoint=weights)


# ---------------------------------------------------------------- 8. long file names


def test_file_names_as_long_as_camera_trap_software_writes_them_reach_the_shards(tmp_path):
    from PIL import Image

    from jaguar.data.prep import prepare
    from jaguar.data.shards import ShardSplit

    # past ustar's 100-byte member name, up to the file system's 255 bytes, and non-ASCII (2 bytes a letter)
    names = {"Zorro": ["RCNX0001_" + "x" * 230 + ".png", "IMG_0002.png"],
             "Abril": ["Câmera_03_2024-05-17_" + "ã" * 110 + ".png", "IMG_0003.png"]}
    rng = np.random.default_rng(0)
    for identity, files in names.items():
        (tmp_path / "src" / identity).mkdir(parents=True)
        for name in files:
            assert len(name.encode()) <= 255
            Image.fromarray(rng.integers(0, 255, (12, 10, 4), dtype=np.uint8), "RGBA").save(
                tmp_path / "src" / identity / name)
    prepare(tmp_path / "src", tmp_path / "out", workers=1)
    split = ShardSplit(tmp_path / "out", "train")
    expected = sorted(f"{identity}/{name}" for identity, files in names.items() for name in files)
    assert sorted(split.filenames) == expected
    for index in range(len(split)):
        image, meta = split[index]
        assert meta["filename"] == split.filenames[index] and np.asarray(image).shape == (12, 10, 4)
