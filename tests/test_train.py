"""The trainer end to end on CPU: 2-process DDP (gloo), DeepSpeed ZeRO-2, gradient accumulation,
kill -9 and resume bit-identity, preemption, TensorBoard tags, atomic checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jaguar.core.weights import load_weights, read_state
from jaguar.run_checkpoints import CheckpointFolder, STATE_FILE, WEIGHTS_FILE, is_complete

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return env


def _small(shards_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards_dir}", f"run.dir={run_dir}", "model.img_size=[48,48]",
            "data.p_identities=2", "data.k_images=4", "data.val_fraction=0.2", "train.log_every=1",
            "data.num_workers=0", *extra]


def _accelerate(config: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)


def _jaguar(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaguar.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout)


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    values = {tag: [e.value for e in events.Scalars(tag)] for tag in tags["scalars"]}
    values.update({tag: [] for tag in tags["images"]})
    return values


# One process of a 2-process run of the tiny recipe: the run's metrics and this rank's parameter checksum.
_IN_STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaguar.config import load_config
    from jaguar.train.trainer import Trainer
    out, recipe, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(recipe, overrides))
    metrics = trainer.train()
    checksum = sum(float(p.detach().double().sum()) for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    with open(f"{out}.{trainer.accelerator.process_index}.json", "w") as handle:
        json.dump({"world_size": metrics["world_size"], "checksum": checksum}, handle)
    from jaguar.core.accelerator import end_process_group
    end_process_group()
""")


def test_two_process_ddp_trains_in_step(shards_dir, tmp_path):
    run, script, out = tmp_path / "run", tmp_path / "in_step.py", tmp_path / "rank"
    script.write_text(_IN_STEP_SCRIPT)
    result = _accelerate("cpu_2proc.yaml", str(script), str(out), TINY,
                         *_small(shards_dir, run, "train.epochs=6", "train.eval_every=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    assert reports[0]["world_size"] == 2
    # DDP keeps the replicas identical: every rank ends with the same parameter checksum.
    assert reports[0]["checksum"] == reports[1]["checksum"]
    assert (run / "config.yaml").is_file() and (run / "split.json").is_file()
    scalars = _scalars(run)
    for tag in ("train/loss", "train/loss_ce", "train/loss_triplet", "train/grad_norm", "train/images_per_sec",
                "train/epoch_time_s", "val/mAP_balanced", "val/rank1", "model/gem_p", "val/retrieval_grid"):
        assert tag in scalars, f"missing TensorBoard tag {tag}: {sorted(scalars)}"
    assert any(tag.startswith("train/lr/") for tag in scalars)
    losses = scalars["train/loss"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["mAP_balanced"] > 0
    assert is_complete(run / "checkpoints" / "best")
    assert CheckpointFolder(run / "checkpoints").steps(), "no step checkpoint written"


def test_deepspeed_zero2_bf16_runs_through_the_same_trainer_and_exports_the_fp32_masters(shards_dir, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = tmp_path / "run"
    result = _accelerate("cpu_2proc_zero2.yaml", TINY,
                         *_small(shards_dir, run, "train.epochs=5", "train.max_steps=2", "train.eval_every=1",
                                 "train.precision=bf16"),
                         timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["world_size"] == 2
    final = run / "checkpoints" / "step-000002"
    assert is_complete(final) and (final / WEIGHTS_FILE).is_file()
    exported = load_file(str(final / WEIGHTS_FILE))
    # DeepSpeed's own resume state, read back by its own tool: the optimizer's fp32 master weights
    # (merged from both ZeRO partitions), and the module's bf16 copies; DeepSpeed holds the
    # TrainedModules, where the model's tensors are under "model.".
    masters = _model_part(get_fp32_state_dict_from_zero_checkpoint(str(final), tag="pytorch_model"))
    bf16_copy = _model_part(torch.load(final / "pytorch_model" / "mp_rank_00_model_states.pt",
                                       weights_only=False)["module"])
    trained = [key for key in masters if bf16_copy[key].dtype == torch.bfloat16 and key in exported]
    assert len(trained) > 10
    for key in trained:
        assert exported[key].dtype == torch.float32
        assert torch.equal(exported[key], masters[key].float()), key
    differs = [key for key in trained if not torch.equal(exported[key], bf16_copy[key].float())]
    assert len(differs) > len(trained) // 2, "the export still holds the bf16 copies"
    # the BNNeck weight starts at 1.0: after two updates its bf16 copy may still round to 1.0, the master not
    assert not torch.equal(exported["neck.bnneck.weight"], torch.ones_like(exported["neck.bnneck.weight"]))


def _model_part(state: dict) -> dict:
    from jaguar.train.optim import TrainedModules

    prefix = TrainedModules.MODEL_PREFIX
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def test_center_loss_under_deepspeed_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    from jaguar.config import ConfigError, load_config
    from jaguar.train.trainer import Trainer

    # Today DeepSpeed steps its one optimizer inside backward(): the centres' own SGD would never run.
    base = [f"run.dir={tmp_path / 'run'}", "data.shards=/nonexistent", "loss.center_weight=0.0005"]
    zero2 = f"train.deepspeed_config={ROOT / 'launch' / 'deepspeed' / 'zero2.json'}"
    with pytest.raises(ConfigError, match=r"loss.center_weight=0.0005 cannot be trained under DeepSpeed"):
        Trainer(load_config(TINY, [*base, zero2]))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # `accelerate launch` with a DeepSpeed config
    with pytest.raises(ConfigError, match="loss.center_weight"):
        Trainer(load_config(TINY, base))
    assert not (tmp_path / "run").exists()


def test_missing_shards_leave_no_run_folder(tmp_path):
    from jaguar.config import load_config
    from jaguar.errors import JaguarError
    from jaguar.train.trainer import Trainer

    # A user who mistypes data.shards gets the error and no half-made run folder holding a config.
    with pytest.raises(JaguarError, match="nonexistent.*does not exist"):
        Trainer(load_config(TINY, [f"run.dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'nonexistent'}"]))
    assert not (tmp_path / "run").exists()


# One optimizer step on a fixed global batch of 8 images (this rank's share of it, in `accum`
# micro-batches), with center loss; then one step that mixes the batch on rank 0 only. Writes the
# model's tensors and the centres before, after the step and after the mixed step (OUT[.RANK]).
_GA_SCRIPT = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from jaguar.config import load_config
    from jaguar.train.trainer import Trainer
    shards, run, accum, out = sys.argv[1:5]
    cfg = load_config(None, [f"data.shards={shards}", f"run.dir={run}", "model.backbone=test_vit",
        "model.img_size=[32,32]", "model.neck=none", "model.pooling=avg", "model.head=arcface",
        "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0",
        "optim.scheduler=constant", "data.num_workers=0", f"train.grad_accum={accum}", "data.val_fraction=0",
        "data.p_identities=2", "data.k_images=2", "loss.center_weight=0.05", "loss.center_lr=0.5"])
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    suffix = f".{acc.process_index}" if acc.num_processes > 1 else ""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    share = 8 // acc.num_processes
    first, size = acc.process_index * share, share // int(accum)
    batches = [(images[i:i + size], labels[i:i + size], torch.arange(i, i + size))
               for i in range(first, first + share, size)]

    def trained(**extra):
        state = {k: v.detach().clone().contiguous() for k, v in trainer.reid_model.state_dict().items()}
        return {**state, "CENTERS": trainer.criterion.center.centers.detach().clone(), **extra}

    with torch.no_grad():
        features = trainer.reid_model(images).features.float()
    save_file(trained(FEATURES=features), out + ".before" + suffix)
    trainer._optimizer_step(iter(batches))
    save_file(trained(), out + suffix)
    cfg.data.mixup_alpha, cfg.data.mixup_prob = 0.4, 1.0 if acc.process_index == 0 else 0.0
    trainer._optimizer_step(iter(batches))
    save_file(trained(), out + ".mixed" + suffix)
    from jaguar.core.accelerator import end_process_group
    end_process_group()
""")


def _ga_run(shards_dir: Path, tmp_path: Path, accum: int, processes: int = 1) -> Path:
    out = tmp_path / f"ga{accum}x{processes}.safetensors"
    args = [str(shards_dir), str(tmp_path / f"r{accum}x{processes}"), str(accum), str(out)]
    if processes == 1:
        result = subprocess.run([sys.executable, "-c", _GA_SCRIPT, *args], capture_output=True, text=True,
                                cwd=ROOT, env=_env(), timeout=300)
    else:
        script = tmp_path / "ga_script.py"
        script.write_text(_GA_SCRIPT)
        result = _accelerate("cpu_2proc.yaml", str(script), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_gradient_accumulation_matches_large_batch(shards_dir, tmp_path):
    one_step, accumulated = (load_file(str(_ga_run(shards_dir, tmp_path, accum))) for accum in (1, 2))
    before = load_file(str(tmp_path / "ga1x1.safetensors.before"))
    moved = [key for key in one_step if not torch.equal(one_step[key], before[key])]
    assert len(moved) > len(one_step) // 2, "the optimizer step changed almost nothing"
    for key, value in one_step.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # BoT's centre update, by hand: SGD at loss.center_lr on the unweighted center-loss gradient,
    # d/dc mean_i ||f_i - c_(y_i)||^2 = -2/8 sum_(y_i = c) (f_i - c) over the global batch of 8.
    centers, features = before["CENTERS"], before["FEATURES"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    gradient = torch.zeros_like(centers).index_add_(0, labels, -2.0 / 8 * (features - centers[labels]))
    torch.testing.assert_close(one_step["CENTERS"], centers - 0.5 * gradient, rtol=1e-5, atol=1e-6)
    # a mixed batch trains the model but leaves the centres exactly as they were
    mixed = load_file(str(tmp_path / "ga1x1.safetensors.mixed"))
    assert torch.equal(mixed["CENTERS"], one_step["CENTERS"])
    assert not torch.equal(mixed["head.weight"], one_step["head.weight"])


@pytest.mark.slow
def test_ddp_averages_the_centres_like_the_model(shards_dir, tmp_path):
    one = load_file(str(_ga_run(shards_dir, tmp_path, 1)))
    out = _ga_run(shards_dir, tmp_path, 1, processes=2)
    ranks = [load_file(f"{out}.{rank}") for rank in range(2)]
    # two ranks of 4 images take the step the one process took on all 8, centres included
    for key, value in one.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # a step mixed on rank 0 only (no center term there, a zero gradient) keeps both ranks equal
    for stage in ("", ".mixed"):
        first, second = (load_file(f"{out}{stage}.{rank}") for rank in range(2))
        for key in first:
            assert torch.equal(first[key], second[key]), f"{key}{stage} differs between the ranks"
    mixed = load_file(f"{out}.mixed.0")
    assert not torch.equal(mixed["CENTERS"], ranks[0]["CENTERS"]), "rank 1's center gradient was lost"


def test_kill_and_resume_is_bit_identical(shards_dir, tmp_path):
    args = ["train", TINY, *_small(shards_dir, tmp_path / "x", "model.img_size=[64,64]", "train.epochs=100",
                                   "train.max_steps=24", "train.checkpoint_every=3", "train.keep_last=20",
                                   "train.eval_every=0", "model.dropout=0.1", "loss.center_weight=0.0005")]
    straight = tmp_path / "straight"
    result = _jaguar(*[a if not a.startswith("run.dir=") else f"run.dir={straight}" for a in args])
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaguar.cli.main",
           *[a if not a.startswith("run.dir=") else f"run.dir={killed}" for a in args]]
    process = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-000006"
    deadline = time.time() + 300
    while not is_complete(target) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not is_complete(killed / "checkpoints" / "step-000024"), "run finished before it could be killed"
    # A half-written checkpoint left behind by the kill is never picked up.
    (killed / "checkpoints" / ".step-000099.partial").mkdir(exist_ok=True)
    (killed / "checkpoints" / "step-000098").mkdir(exist_ok=True)

    result = _jaguar(*[a if not a.startswith("run.dir=") else f"run.dir={killed}" for a in args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    a = load_file(str(straight / "checkpoints" / "step-000024" / WEIGHTS_FILE))
    b = load_file(str(killed / "checkpoints" / "step-000024" / WEIGHTS_FILE))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill -9 and resume"
    # the exported weights are the model's alone (the centres stay in the training state): extraction
    # loads them strictly into a model built from the run's config
    from jaguar.models import build_model
    from jaguar.run import RunDir

    run = RunDir(straight)
    model = build_model(run.load_config(), run.load_metrics().num_classes)
    load_weights(model, straight / "checkpoints" / "step-000024")
    assert set(a) == set(model.state_dict())


def test_preempt_file_checkpoints_and_exits(shards_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "PREEMPT").touch()
    result = _jaguar("train", TINY, *_small(shards_dir, run, "train.epochs=5", "train.eval_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preempted" in result.stderr
    assert not (run / "PREEMPT").exists()
    assert [p.name for p in CheckpointFolder(run / "checkpoints").steps()] == ["step-000001"]
    # The requeued job continues from there.
    result = _jaguar("train", TINY, *_small(shards_dir, run, "train.epochs=5", "train.eval_every=0",
                                            "train.max_steps=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert read_state(CheckpointFolder(run / "checkpoints").steps()[-1])["step"] == 3


def test_a_pickle_payload_in_a_handed_checkpoint_never_runs_and_resume_refuses_it(shards_dir, tmp_path):
    run = tmp_path / "run"
    result = _jaguar("train", TINY, *_small(shards_dir, run, "train.max_steps=1", "train.eval_every=0"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = CheckpointFolder(run / "checkpoints").steps()[-1]
    assert not list(checkpoint.glob("custom_checkpoint_*.pkl"))  # jaguar's own state is not pickled objects
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # accelerate would unpickle this with weights_only=False on resume
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    result = _jaguar("train", TINY, *_small(shards_dir, run, "train.max_steps=2", "train.eval_every=0"))
    assert result.returncode == 2 and not marker.exists()
    assert f"checkpoint {checkpoint} is refused" in result.stderr
    assert "custom_checkpoint_0.pkl: not written by jaguar" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_full_disk_while_checkpointing_is_named_and_leaves_no_partial_checkpoint(shards_dir, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        result = _jaguar("train", TINY, *_small(shards_dir, disk / "run", "train.max_steps=1", "train.eval_every=0"))
        assert result.returncode == 2
        assert f"could not write {disk / 'run' / 'checkpoints' / 'step-000001'}: disk full on" in result.stderr
        assert "Traceback" not in result.stderr
        assert not list((disk / "run" / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_checkpoint_of_the_model_alone_is_not_resumed(shards_dir, tmp_path):
    from jaguar.config import ConfigError, load_config
    from jaguar.train.trainer import Trainer

    # saved before the centres were prepared with the model: its state has no "layout"
    old = tmp_path / "run" / "checkpoints" / "step-000001"
    old.mkdir(parents=True)
    (old / STATE_FILE).write_text(json.dumps({"step": 1, "steps_per_epoch": 1}))
    trainer = Trainer(load_config(TINY, _small(shards_dir, tmp_path / "run")))
    with pytest.raises(ConfigError, match=f"checkpoint {old} was saved by an earlier jaguar.*train.init_from={old}"):
        trainer.train()


def test_resume_ignores_incomplete_checkpoints(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step-000002", "step-000004"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / STATE_FILE).write_text("{}")
    (checkpoints / "step-000006").mkdir()  # killed before trainer_state.json was written
    (checkpoints / ".step-000008.partial").mkdir()
    assert CheckpointFolder(checkpoints).resume_from("auto") == checkpoints / "step-000004"
    assert CheckpointFolder(checkpoints).resume_from("none") is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        CheckpointFolder(checkpoints).resume_from(str(checkpoints / "step-000006"))


_NAN_SCRIPT = textwrap.dedent("""
    import copy, json, sys, torch
    from jaguar.config import load_config
    from jaguar.train.trainer import Trainer, TrainingStopped
    shards, run, out = sys.argv[1:4]
    cfg = load_config(None, [f"data.shards={shards}", f"run.dir={run}", "model.backbone=test_vit",
        "model.img_size=[32,32]", "model.pooling=gem", "model.head=arcface", "optim.ema=true",
        "optim.ema_decay=0.5", "data.num_workers=0", "data.val_fraction=0", "data.p_identities=2",
        "data.k_images=2", "train.max_bad_steps=2", "train.eval_every=0", "optim.grad_clip=0"])
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    model = trainer.reid_model
    trainer.loader.batch_sampler.set_position(0, 0)
    batches = iter(trainer.loader)

    def state():
        return ({k: v.detach().clone() for k, v in model.state_dict().items()},
                copy.deepcopy(trainer.optimizer.state_dict()["state"]),
                {k: v.detach().clone() for k, v in trainer.ema.module.state_dict().items()})

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    def step():
        _, norm, _ = trainer._optimizer_step(batches)
        trainer.step += 1
        return norm

    report = {"rank": acc.process_index}
    step()  # a good update first, so that the optimizer and EMA have state to protect
    before = state()
    # a finite loss whose backward gives NaN in one weight's gradient, on rank 0 only
    poison = model.head.weight.register_hook(lambda g: g * float("nan") if acc.process_index == 0 else g)
    report["bad_norm"] = step()
    after = state()
    report["weights_kept"] = same(before[0], after[0])
    report["optimizer_kept"] = same(before[1], after[1])
    report["ema_kept"] = same(before[2], after[2])
    report["all_finite"] = all(bool(torch.isfinite(v).all()) for v in after[0].values() if v.is_floating_point())
    report["skipped"] = trainer.guard.skipped
    poison.remove()
    report["good_norm"] = step()
    report["moved"] = not same(after[0], state()[0])
    report["streak_after_good"] = trainer.guard.streak
    report["checksum"] = sum(float(p.detach().double().sum()) for p in trainer.accelerator.unwrap_model(trainer.model).parameters())
    model.head.weight.register_hook(lambda g: g * float("nan"))
    try:
        for _ in range(5):
            step()
        report["stopped"] = None
    except TrainingStopped as err:
        report["stopped"] = str(err)
    report["steps_skipped_at_stop"] = trainer.guard.skipped
    trainer.tb.close()
    with open(f"{out}.{acc.process_index}.json", "w") as handle:
        json.dump(report, handle)
    from jaguar.core.accelerator import end_process_group
    end_process_group()
""")


def _check_nan_gradient_reports(out: Path, ranks: int, run: Path) -> None:
    reports = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(ranks)]
    for report in reports:
        assert report["bad_norm"] is None  # a skipped update reports no norm
        assert report["weights_kept"] and report["optimizer_kept"] and report["ema_kept"], report
        assert report["all_finite"] and report["skipped"] == 1
        assert report["good_norm"] is not None and report["moved"] and report["streak_after_good"] == 0
        # train.max_bad_steps=2: the third skipped update in a row stops the run, with fp32 advice
        assert report["stopped"] is not None and report["steps_skipped_at_stop"] == 4
        assert "already fp32" in report["stopped"] and "use train.precision=fp32" not in report["stopped"]
        assert "3 optimizer updates in a row" in report["stopped"]
    checksums = [report["checksum"] for report in reports]
    assert len(checksums) == ranks and len(set(checksums)) == 1, "ranks took different decisions"
    assert _scalars(run)["train/skipped_steps"][:2] == [1.0, 2.0]


def test_nan_gradient_skips_the_update_and_repeated_ones_stop_the_run(shards_dir, tmp_path):
    out = tmp_path / "nan"
    result = subprocess.run([sys.executable, "-c", _NAN_SCRIPT, str(shards_dir), str(tmp_path / "run"), str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "non-finite gradient" in result.stderr and "update skipped" in result.stderr
    _check_nan_gradient_reports(out, 1, tmp_path / "run")


@pytest.mark.slow
def test_nan_gradient_on_one_rank_is_skipped_by_both_ranks(shards_dir, tmp_path):
    script = tmp_path / "nan_script.py"
    script.write_text(_NAN_SCRIPT)
    out = tmp_path / "nan"
    result = _accelerate("cpu_2proc.yaml", str(script), str(shards_dir), str(tmp_path / "run"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    _check_nan_gradient_reports(out, 2, tmp_path / "run")


@pytest.mark.parametrize("precision, advice, not_advised", [
    ("fp32", "already fp32", "train.precision=fp32"),
    ("bf16", "train.precision=fp32 tells", "loss scale"),
    ("fp16", "loss scale is down to 0.125", "already fp32"),
])
def test_stop_message_fits_the_precision_and_streaks_reset(precision, advice, not_advised):
    from jaguar.train.guard import NonFiniteGuard, TrainingStopped

    guard = NonFiniteGuard(max_in_a_row=2, precision=precision, deepspeed=False)
    scale = 0.125 if precision == "fp16" else None
    for step in range(2):
        guard.update_done(False, step, loss_finite=step == 0, grad_norm=float("nan"), loss_scale=scale)
    guard.update_done(True, 2, True, 1.0, scale)  # a good update ends the streak
    assert (guard.streak, guard.skipped) == (0, 2)
    guard.load_state_dict(guard.state_dict())
    for step in range(3, 5):
        guard.update_done(False, step, loss_finite=True, grad_norm=float("inf"), loss_scale=scale)
    with pytest.raises(TrainingStopped) as stopped:
        guard.update_done(False, 5, loss_finite=False, grad_norm=None, loss_scale=scale)
    message = str(stopped.value)
    assert "3 optimizer updates in a row" in message and "1 of them already a non-finite loss" in message
    assert advice in message and not_advised not in message
