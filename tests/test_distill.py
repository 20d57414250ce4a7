"""Knowledge distillation: the losses (zero when the student matches the teacher, a gradient
otherwise), the teacher's embeddings looked up by training position, the config's rules, a
tiny one-process training run distilling a teacher run's extracted embeddings, and 2-process runs
(DDP, ZeRO-2) distilling on both ranks and resumed from their checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from jaguar.cli.main import main
from jaguar.config import ConfigError, load_config
from jaguar.errors import MissingInputError
from jaguar.models.losses import ReIDCriterion, cosine_distillation_loss, similarity_distillation_loss
from jaguar.models.reid import ReIDOutput
from jaguar.report.tb_reader import read_scalars
from jaguar.core.features import FeatureSet
from jaguar.run import RunDir
from jaguar.run_checkpoints import is_complete
from jaguar.train.distill import TeacherEmbeddings, load_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
SMALL = ["model.backbone=test_resnet", "model.img_size=[32,48]", "data.p_identities=2", "data.k_images=4",
         "data.val_fraction=0.25", "data.num_workers=0", "data.batch_size=7"]


def _embeddings(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


def test_similarity_distillation_is_zero_for_the_teachers_geometry_and_has_a_gradient():
    teacher = _embeddings(8, 16, 0)
    assert similarity_distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # another width, same similarities (an orthogonal map, and any scale): nothing to learn
    rotation, _ = torch.linalg.qr(_embeddings(24, 24, 1))
    widened = torch.cat([teacher, torch.zeros(8, 8)], dim=1) @ rotation * 3.0
    assert similarity_distillation_loss(widened, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = _embeddings(8, 12, 2).requires_grad_(True)
    loss = similarity_distillation_loss(student, teacher)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # a step along the gradient brings the student's similarities closer to the teacher's
    with torch.no_grad():
        assert similarity_distillation_loss(student - 0.5 * student.grad, teacher) < loss


def test_cosine_distillation_is_zero_when_aligned_and_needs_one_width():
    teacher = _embeddings(6, 16, 3)
    assert cosine_distillation_loss(teacher * 2.0, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = _embeddings(6, 16, 4).requires_grad_(True)
    loss = cosine_distillation_loss(student, teacher)
    loss.backward()
    assert loss.item() > 0 and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one width"):
        cosine_distillation_loss(_embeddings(6, 8, 5), teacher)


def test_the_criterion_adds_the_weighted_term_and_skips_mixed_batches():
    cfg = load_config(None, ["distill.teacher=somewhere", "distill.weight=2.5"])
    criterion = ReIDCriterion(cfg, num_classes=3, feat_dim=8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    output = ReIDOutput(_embeddings(6, 8, 6), _embeddings(6, 8, 7), torch.rand(6, 3))
    teacher = _embeddings(6, 5, 8)
    plain = criterion(output, labels)
    distilled = criterion(output, labels, teacher=teacher)
    assert "distill" not in plain
    assert distilled["distill"].item() == pytest.approx(similarity_distillation_loss(output.embedding, teacher).item())
    assert distilled["loss"].item() == pytest.approx(plain["loss"].item() + 2.5 * distilled["distill"].item(), rel=1e-6)
    mixed = criterion(output, labels, mix=(labels.flip(0), 0.7), teacher=teacher)
    assert "distill" not in mixed


def test_teacher_embeddings_are_found_by_training_position():
    features = FeatureSet(["c.png", "a.png", "b.png"], torch.eye(3), torch.tensor([0, 1, 2]))
    filenames = ["a.png", "b.png", "c.png", "d.png"]
    table = TeacherEmbeddings.from_features(features, filenames, [0, 2], "teacher/features/train.safetensors")
    assert torch.equal(table.lookup(torch.tensor([2, 0, 2])), torch.eye(3)[[0, 1, 0]])
    with pytest.raises(ValueError):
        table.lookup([1])  # not a training image
    with pytest.raises(ConfigError, match=r"lack 1 of the 3 training images \(e\.g\. \['d\.png'\]\).*--split train"):
        TeacherEmbeddings.from_features(features, filenames, [0, 2, 3], "teacher/features/train.safetensors")


def test_distillation_config_is_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="distill.weight is 0"):
        load_config(None, ["distill.teacher=runs/t", "distill.weight=0"])
    with pytest.raises(ConfigError, match="did you mean similarity"):
        load_config(None, ["distill.loss=similarty"])
    # the teacher alone may train the student
    load_config(None, ["distill.teacher=runs/t", "loss.ce_weight=0"])
    with pytest.raises(ConfigError, match="enable at least one term"):
        load_config(None, ["loss.ce_weight=0"])
    cfg = load_config(None, [f"distill.teacher={tmp_path}"])
    with pytest.raises(MissingInputError, match=r"jaguar extract .* --split train"):
        load_teacher(cfg, ["a.png"], [0], 8)


def test_a_tiny_run_distils_a_teacher_runs_embeddings(shards_dir, tmp_path):
    teacher = tmp_path / "teacher"
    for split in ("train", "val"):  # a zero-shot teacher: the recipe's backbone as built, another width
        assert main(["extract", "--config", TINY, f"data.shards={shards_dir}", f"run.dir={teacher}", "--split", split,
                     *SMALL, "model.backbone=resnet10t"]) == 0
    student = tmp_path / "student"
    assert main(["train", TINY, f"data.shards={shards_dir}", f"run.dir={student}", *SMALL, "train.epochs=1",
                 "train.log_every=1", f"distill.teacher={teacher}", "distill.weight=5"]) == 0
    scalars = read_scalars(RunDir(student).tb_dir)
    assert "train/loss_distill" in scalars and len(scalars["train/loss_distill"]) > 0
    assert all(value >= 0 for value in scalars["train/loss_distill"].values)
    assert RunDir(student).load_config().distill.teacher == str(teacher)
    # cosine distillation between different widths is refused before any step, naming the key to set
    with pytest.raises(ConfigError, match="model.reduce_dim="):
        main_config = load_config(TINY, [f"data.shards={shards_dir}", f"run.dir={tmp_path / 'other'}", *SMALL,
                                         f"distill.teacher={teacher}", "distill.loss=cosine"])
        from jaguar.train.trainer import Trainer

        Trainer(main_config)


# One process of a 2-process run: the trainer as `jaguar train` builds it, recording on its rank the
# training positions each micro-batch looks up in the teacher's table, the distillation term of each
# step, and the step the run starts from (after resuming).
_RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from jaguar.config import load_config
    from jaguar.train.trainer import Trainer
    out, recipe, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(recipe, overrides))
    record = {"positions": [], "distill": []}
    lookup, optimizer_step, resume = trainer.teacher.lookup, trainer._optimizer_step, trainer._resume
    def recording_lookup(positions):
        record["positions"].append([int(p) for p in positions])
        return lookup(positions)
    def recording_step(batches):
        terms, grad_norm, count = optimizer_step(batches)
        record["distill"].append(terms.get("distill"))
        return terms, grad_norm, count
    def recording_resume():
        resume()
        record["start"] = trainer.step
    trainer.teacher.lookup = recording_lookup
    trainer._optimizer_step = recording_step
    trainer._resume = recording_resume
    metrics = trainer.train()
    record.update(steps=metrics["steps"], world_size=metrics["world_size"], checksum=sum(float(p.detach().double().sum()) for p in trainer.accelerator.unwrap_model(trainer.model).parameters()),
                  train=sorted(int(p) for p in trainer.run_split.train_indices))
    with open(f"{out}.{trainer.accelerator.process_index}.json", "w") as handle:
        json.dump(record, handle)
    from jaguar.core.accelerator import end_process_group
    end_process_group()
""")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _two_processes(script: Path, out: Path, launch_config: str, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / launch_config),
           str(script), str(out), TINY, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", ["cpu_2proc.yaml", "cpu_2proc_zero2.yaml"])
def test_two_process_run_distils_on_both_ranks_and_resumes(shards_dir, tmp_path, launch_config):
    """Distillation on 2 CPU processes (gloo) under DDP and under DeepSpeed ZeRO-2, then resumed with
    train.resume=auto: the teacher lookup and the loss term sit in the trainer's `_optimizer_step`
    before `accelerator.backward`, one path for both; the teacher's table is read by each rank from
    the teacher's feature files, not from any state that DeepSpeed partitions or checkpoints."""
    teacher = tmp_path / "teacher"
    for split in ("train", "val"):
        assert main(["extract", "--config", TINY, f"data.shards={shards_dir}", f"run.dir={teacher}", "--split", split,
                     *SMALL, "model.backbone=resnet10t"]) == 0
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT)
    run = tmp_path / "student"
    common = [f"data.shards={shards_dir}", f"run.dir={run}", *SMALL, "train.epochs=5", "train.eval_every=0",
              "train.log_every=1", f"distill.teacher={teacher}", "distill.weight=5", "train.resume=auto"]
    first = _two_processes(script, tmp_path / "first", launch_config, *common, "train.max_steps=1")
    second = _two_processes(script, tmp_path / "second", launch_config, *common, "train.max_steps=2")
    for reports, start, steps in ((first, 0, 1), (second, 1, 2)):
        for report in reports:
            assert report["world_size"] == 2 and report["steps"] == steps
            assert report["start"] == start  # the second run continued the first one's checkpoint
            # one optimizer step this run, on every rank: its batch found in the teacher's table
            # (a training image outside it would have raised), and a finite, positive term
            assert len(report["distill"]) == 1 and len(report["positions"]) == 1
            assert set(report["positions"][0]) <= set(report["train"]) and report["positions"][0]
            assert report["distill"][0] is not None and 0 < report["distill"][0] < float("inf")
        # each rank distilled its own share of the batch, and the replicas stayed identical (DDP, ZeRO-2)
        assert reports[0]["positions"] != reports[1]["positions"]
        assert reports[0]["checksum"] == reports[1]["checksum"]
    # the resumed step's batches are the sampler's next ones, not the first step's again
    assert [r["positions"] for r in second] != [r["positions"] for r in first]
    assert is_complete(run / "checkpoints" / "step-000002")
