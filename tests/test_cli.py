"""The `jaguar` command itself: its parser and every `--help` import nothing heavy (torch, numpy,
timm, ...), `--version` and `python -m jaguar` work, and an interrupted command (Ctrl-C, SIGTERM)
says in one line what was stopped, what was kept and how to resume, without a traceback."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jaguar
from jaguar.cli.main import COMMAND_MODULES

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.py")
HEAVY = ("torch", "torchvision", "timm", "numpy", "safetensors", "PIL", "accelerate", "faiss", "cv2",
         "pyarrow", "matplotlib", "webdataset")


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(),
                          timeout=120)


def _heavy_after(calls: str) -> list[str]:
    """The heavy modules imported by a fresh interpreter after running `calls` (Python statements)."""
    result = _python(f"import sys\n{calls}\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY="))
    return [name for name in line[len("HEAVY="):].split(",") if name]


def test_help_of_jaguar_and_of_every_command_imports_nothing_heavy():
    commands = [name.rsplit(".", 1)[1][len("cmd_"):].replace("_", "-") for name in COMMAND_MODULES]
    calls = ("import contextlib, io\nfrom jaguar.cli.main import build_parser, main\n"
             "names = list(next(a for a in build_parser()._actions if a.dest == 'command').choices)\n"
             "print('COMMANDS=' + ','.join(names))\n"
             "for argv in [['--help'], *([name, '--help'] for name in names)]:\n"
             "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
             "        main(argv)\n")
    assert _heavy_after(calls) == []
    listed = _python("from jaguar.cli.main import build_parser\n"
                     "print(' '.join(next(a for a in build_parser()._actions if a.dest == 'command').choices))")
    assert len(listed.stdout.split()) == len(commands)  # every command module's --help was asked for


def test_python_dash_m_jaguar_prints_help_and_version():
    helped = subprocess.run([sys.executable, "-m", "jaguar", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=_env(), timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: jaguar") and "extract" in helped.stdout
    version = subprocess.run([sys.executable, "-m", "jaguar", "--version"], capture_output=True, text=True,
                             cwd=ROOT, env=_env(), timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"jaguar {jaguar.__version__}"


def test_config_show_does_not_import_torch():
    assert "torch" not in _heavy_after(
        "import contextlib, io\nfrom jaguar.cli.main import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['config', 'show', {TINY!r}]) == 0\n")


def test_verify_does_not_import_torch(shards_dir):
    assert "torch" not in _heavy_after(
        "import contextlib, io\nfrom jaguar.cli.main import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['verify', {str(shards_dir)!r}]) == 0\n")


def _main_output(argv: list) -> tuple[str, list[str]]:
    """(stdout, heavy modules imported) of `jaguar ARGV` run in a fresh interpreter."""
    result = _python("import contextlib, io, sys\nfrom jaguar.cli.main import main\nout = io.StringIO()\n"
                     f"with contextlib.redirect_stdout(out):\n    code = main({argv!r})\n"
                     "print(out.getvalue())\n"
                     f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\nassert code == 0")
    assert result.returncode == 0, result.stderr[-3000:]
    out, _, heavy = result.stdout.rpartition("HEAVY=")
    return out, [name for name in heavy.strip().split(",") if name]


def test_score_of_a_submission_file_does_not_import_torch(tmp_path):
    (tmp_path / "test.csv").write_text("row_id,query_image,gallery_image\n1,a.png,b.png\n2,a.png,c.png\n"
                                       "3,b.png,a.png\n4,b.png,c.png\n5,c.png,a.png\n6,c.png,b.png\n")
    (tmp_path / "labels.csv").write_text("filename,ground_truth\na.png,Ana\nb.png,Ana\nc.png,Bru\n")
    (tmp_path / "sub.csv").write_text("row_id,similarity\n1,0.1\n2,0.9\n3,0.8\n4,0.2\n5,0.5\n6,0.5\n")
    out, heavy = _main_output(["score", str(tmp_path / "sub.csv"), "--test-csv", str(tmp_path / "test.csv"),
                               "--labels", str(tmp_path / "labels.csv")])
    # a's match ranks 2nd (AP 1/2), b's 1st (AP 1); c has no match and is not averaged
    assert "identity-balanced mAP: 0.750000 (6 pairs, 3 images, 1 identities with a true match among them)" in out
    assert "torch" not in heavy


def test_gallery_listing_does_not_import_torch(tmp_path):
    import torch

    from jaguar.config import Config
    from jaguar.core.features import FeatureSet
    from jaguar.run import RunDir

    run = RunDir(tmp_path / "run")
    run.save_config(Config())
    run.save_features("train", FeatureSet(["t0", "t1", "t2", "t3"], torch.eye(4), torch.tensor([0, 1, 0, -1]),
                                          {0: "Ana", 1: "Bru"}))
    run.save_enrolled(FeatureSet(["e0", "e1"], torch.eye(2, 4), torch.tensor([0, 0]), {0: "Caí"}))
    out, heavy = _main_output(["gallery", str(run.path)])
    assert [line.split() for line in out.splitlines()[1:4]] == [["Ana", "2", "training"], ["Bru", "1", "training"],
                                                                ["Caí", "2", "enrolled"]]
    assert "3 individuals, 5 images" in out
    assert "torch" not in heavy


def _train_until_checkpoint(shards_dir: Path, run: Path) -> tuple[subprocess.Popen, list[str]]:
    """A `jaguar train` with many epochs, once its first complete checkpoint is on disk."""
    from jaguar.run_checkpoints import CheckpointFolder

    argv = ["train", TINY, f"data.shards={shards_dir}", f"run.dir={run}", "model.img_size=[48,48]",
            "data.p_identities=2", "data.k_images=4", "data.val_fraction=0.2", "data.num_workers=0",
            "train.epochs=500", "train.eval_every=0", "train.checkpoint_every=1"]
    process = subprocess.Popen([sys.executable, "-m", "jaguar", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    deadline = time.monotonic() + 300
    while not CheckpointFolder(run / "checkpoints").steps():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    return process, argv


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_says_what_it_kept_and_how_to_resume(shards_dir, tmp_path, signum, status):
    run = tmp_path / "run"
    process, argv = _train_until_checkpoint(shards_dir, run)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "training finished" not in stderr  # a preempted run is not a finished one
    lines = [line for line in stderr.splitlines() if line.startswith("jaguar train: interrupted by ")]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert ("Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM") in line
    assert str(run / "checkpoints") in line and "step-" in line
    assert line.endswith("resume with: jaguar " + shlex.join(argv))


def _interrupting(*args, **kwargs):
    raise KeyboardInterrupt


def test_interrupted_extraction_counts_the_blocks_it_kept(tmp_path, monkeypatch, capsys):
    import jaguar.retrieval.extract
    from jaguar.cli.main import main
    from jaguar.run import RunDir

    run = RunDir(tmp_path / "run")
    run.feature_parts_dir.mkdir(parents=True)
    for start in (0, 8):
        run.feature_part_path("val", start, start + 8, "ab12").write_bytes(b"block")
    (run.feature_parts_dir / ".val-half-written.tmp").write_bytes(b"")  # a killed write: not kept
    monkeypatch.setattr(jaguar.retrieval.extract, "extract_run", _interrupting)
    assert main(["extract", str(run.path), "--split", "val"]) == 130
    line = capsys.readouterr().err.strip()
    assert line == (f"jaguar extract: interrupted by Ctrl-C (SIGINT); kept: 2 finished block(s) of val in "
                    f"{run.feature_parts_dir} (the same command reuses them and computes the rest); resume "
                    f"with: jaguar extract {run.path} --split val")


def test_a_command_without_partial_results_says_nothing_was_half_written(monkeypatch, capsys):
    import jaguar.cli.cmd_config
    from jaguar.cli.main import main

    monkeypatch.setattr(jaguar.cli.cmd_config, "to_yaml", _interrupting)
    assert main(["config", "show"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == ("jaguar config: interrupted by Ctrl-C (SIGINT); kept: nothing half-written (its "
                           "outputs are written whole or not at all); run it again with: jaguar config show")


@pytest.mark.parametrize("how", ["--debug", "JAGUAR_DEBUG"])
def test_debug_prints_the_traceback_of_an_interruption(monkeypatch, capsys, how):
    import jaguar.cli.cmd_config
    from jaguar.cli.main import main

    monkeypatch.setattr(jaguar.cli.cmd_config, "to_yaml", _interrupting)
    if how == "JAGUAR_DEBUG":
        monkeypatch.setenv("JAGUAR_DEBUG", "1")
    assert main(["--debug", "config", "show"] if how == "--debug" else ["config", "show"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" in err and "jaguar config: interrupted by Ctrl-C (SIGINT)" in err


def test_other_libraries_info_lines_stay_out_and_jaguars_own_stay_in():
    result = _python("import logging\nimport jaguar.cli.cmd_config as command\nshow = command._show\n"
                     "def chatty(args):\n"
                     "    logging.getLogger('tensorboard').info('No path found after tb/events')\n"
                     "    logging.getLogger('tensorboard').warning('a real problem')\n"
                     "    logging.getLogger('jaguar.report').info('report written')\n"
                     "    return show(args)\n"
                     "command._show = chatty\nfrom jaguar.cli.main import main\nmain(['config', 'show'])\n")
    assert result.returncode == 0, result.stderr
    assert "No path found" not in result.stderr
    assert "WARNING tensorboard: a real problem" in result.stderr and "INFO jaguar.report: report written" in result.stderr
