"""`jaguar export` on a tiny trained run: the ONNX file embeds as PyTorch does (within 1e-4 cosine
distance, at batch 1 and in a batch) and carries its preprocessing; a failed check writes nothing;
`jaguar extract --model` and `jaguar identify --model` keep the FeatureSet contract and the
decisions, without reading a checkpoint or importing timm; `--int8` reports what it costs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jaguar.cli.main import main
from jaguar.data.shards import load_manifest
from jaguar.retrieval import export as export_module
from jaguar.core.embedding import load_embedder
from jaguar.core.embedding import embed_batch
from jaguar.core.onnx_model import OnnxEmbedding, OnnxModelError
from jaguar.run import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
SMALL = ["model.backbone=test_resnet", "model.img_size=[32,48]", "data.p_identities=2", "data.k_images=4",
         "data.val_fraction=0.25", "data.num_workers=0", "data.batch_size=7", "train.epochs=1", "train.eval_every=1",
         "retrieval.flip_tta=true"]  # the export folds flip TTA into the graph (tiny_cpu's default is off)


@pytest.fixture(scope="module")
def run(shards_dir, tmp_path_factory) -> RunDir:
    """A tiny run trained for one epoch, exported to ONNX (fp32) at the default path."""
    path = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", TINY, f"data.shards={shards_dir}", f"run.dir={path}", *SMALL]) == 0
    assert main(["export", str(path), "--check-images", "16"]) == 0
    return RunDir(path)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - (a.double() * b.double()).sum(dim=1)


def test_exported_model_embeds_as_pytorch_and_describes_its_preprocessing(run):
    cfg = run.load_config()
    model = OnnxEmbedding.load(run.export_path())
    torch_model = load_embedder(cfg, run.default_checkpoint(), None, torch.device("cpu"))
    assert model.mean == torch_model.mean and model.std == torch_model.std
    assert model.embed_dim == torch_model.embed_dim
    assert model.meta["model.img_size"] == [32, 48] and model.meta["data.alpha_mode"] == cfg.data.alpha_mode
    assert model.meta["data.crop_to_alpha"] is cfg.data.crop_to_alpha and model.meta["flip_tta"] is True
    assert model.source == torch_model.source and model.precision == "fp32"
    prep = load_manifest(cfg.data.shards).options  # photos are converted as the shards were, also without them
    assert model.meta["prep"] == {"max_side": prep["max_side"], "encoding": prep["encoding"]}
    images = torch.randn(5, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    expected = embed_batch(torch_model.embed, images, torch.device("cpu"), True, (1.0,))
    for batch in (images[:1], images):  # the batch dimension is dynamic
        got = model.embed(batch)
        assert got.shape == (len(batch), model.embed_dim)
        assert _cosine_distance(got, expected[:len(batch)]).max() < 1e-4
    # the metadata sets the eval transform whatever the run's config says now
    cfg.model.img_size = [64, 64]
    assert model.eval_config(cfg).model.img_size == [32, 48]


def test_export_beyond_tolerance_is_refused_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    def perturbed(path, batches):
        embeddings = OnnxEmbedding.load(path).embed(torch.cat(list(batches)))
        embeddings[0] = -embeddings[0]
        return embeddings

    monkeypatch.setattr(export_module, "_onnx_embeddings", perturbed)
    output = tmp_path / "out" / "model.onnx"
    assert main(["export", str(run.path), "-o", str(output), "--check-images", "8"]) == 2
    assert "exceeds the tolerance" in capsys.readouterr().err
    assert not output.exists() and not any(output.parent.iterdir())


def test_not_an_export_is_a_clear_error(tmp_path):
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="could not be loaded"):
        OnnxEmbedding.load(foreign)


def test_extract_with_the_exported_model_keeps_the_feature_contract(run):
    assert main(["extract", str(run.path), "--split", "val"]) == 0
    reference = run.load_features("val")
    assert main(["extract", str(run.path), "--split", "val", "--model", str(run.export_path())]) == 0
    exported = run.load_features("val")
    assert exported.names == reference.names and torch.equal(exported.labels, reference.labels)
    assert exported.label_names == reference.label_names
    assert _cosine_distance(exported.embeddings, reference.embeddings).max() < 1e-4
    assert exported.meta["model"] == str(run.export_path()) and exported.meta["source"] == reference.meta["source"]
    assert exported.meta["key"] != reference.meta["key"]  # another model: PyTorch's features are recomputed


def test_extract_with_the_exported_model_needs_no_checkpoint_nor_timm(run, tmp_path):
    """A copy of the run without checkpoints (a laptop's) extracts with the ONNX file alone."""
    laptop = tmp_path / "laptop"
    shutil.copytree(run.path, laptop, ignore=shutil.ignore_patterns("checkpoints", "features", "tb"))
    code = ("import sys\nfrom jaguar.cli.main import main\n"
            f"assert main(['extract', {str(laptop)!r}, '--split', 'test', '--model', {str(run.export_path())!r}]) == 0\n"
            "assert 'timm' not in sys.modules, 'timm was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(RunDir(laptop).load_features("test")) > 0


def test_identify_with_the_exported_model_gives_the_same_decisions(run, synth_dir, tmp_path, capsys):
    assert main(["calibrate", str(run.path), "--folds", "2"]) == 0
    photos = sorted((synth_dir / "test").glob("*.png"))[:8]
    outputs = {}
    for name, extra in (("pytorch", []), ("onnx", ["--model", str(run.export_path())])):
        outputs[name] = tmp_path / f"{name}.csv"
        status = main(["identify", str(run.path), *map(str, photos), "--top-k", "3", "-o", str(outputs[name]), *extra])
        assert status == 0
    rows = {name: list(csv.DictReader(open(path, newline=""))) for name, path in outputs.items()}
    assert len(rows["pytorch"]) == len(rows["onnx"]) == 3 * len(photos)
    for torch_row, onnx_row in zip(rows["pytorch"], rows["onnx"]):
        for key in ("photo", "rank", "individual", "decision"):
            assert torch_row[key] == onnx_row[key]
        assert abs(float(torch_row["score"]) - float(onnx_row["score"])) < 1e-3


def test_int8_export_reports_its_agreement_and_extracts(run, tmp_path, capsys):
    output = tmp_path / "model.onnx"
    assert main(["export", str(run.path), "-o", str(output), "--int8", "--check-images", "16"]) == 0
    printed = capsys.readouterr().out
    assert "int8: cosine distance to PyTorch" in printed
    int8 = OnnxEmbedding.load(tmp_path / "model-int8.onnx")
    assert int8.precision == "int8" and int8.meta["int8_mode"] == "static"
    check = int8.meta["check"]
    assert check["images"] == min(16, len(run.load_split().val))
    assert 0.0 <= check["mean_cosine_distance"] <= check["max_cosine_distance"] < 0.5
    images = torch.randn(4, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    fp32 = OnnxEmbedding.load(output).embed(images)
    assert _cosine_distance(int8.embed(images), fp32).mean() < 0.5
    assert torch.allclose(int8.embed(images).norm(dim=1), torch.ones(4), atol=1e-4)


def test_the_cli_imports_no_onnx_until_an_export_is_used():
    code = ("import sys\nfrom jaguar.cli.main import build_parser\nbuild_parser()\n"
            "import jaguar.retrieval.extract, jaguar.retrieval.openset.identify, jaguar.retrieval.openset.photos\n"
            "print(json.dumps(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
