"""The README's main command end to end, in its small CI form: `bash launch/demo.sh --fast`."""

import csv
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_fast_runs_every_stage_and_skips_them_when_rerun(tmp_path):
    demo = tmp_path / "demo"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "--fast", "--dir", str(demo)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = demo / "run"
    with open(demo / "raw" / "test_labels.csv") as handle:
        test_images = sum(1 for _ in handle) - 1
    with open(run / "submission.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["row_id", "similarity"] and len(rows) - 1 == test_images * (test_images - 1)
    score = json.loads((run / "score.json").read_text())
    assert 0.0 < score["mAP_balanced"] <= 1.0
    table = json.loads((run / "score_table.json").read_text())["table"]
    assert {row["name"] for row in table} >= {"raw", "+QE", "+re-ranking", "local only", "fused"}
    assert (run / "local" / "val.safetensors").is_file() and (run / "local" / "test.safetensors").is_file()
    for words in ("local only (inliers", "fused with local (w = "):  # tune-post's and score's rows
        assert result.stdout.count(words) >= 2, f"the demo does not print the {words} rows"
    assert (run / "report" / "index.html").is_file()
    from jaguar.run import RunDir

    for row in RunDir(run).load_post().table:  # each stage, named by what it does (QE, DBA, re-ranking, ...)
        assert row.label() in result.stdout, f"the demo does not print the {row.name} score"
    assert "tensorboard --logdir" in result.stdout
    for words in ("background only", "chance", "mirror self-similarity", "cross flank"):
        assert words in result.stdout, f"the demo does not print the diagnostics' {words}"
    assert (run / "diagnose_test.json").is_file()

    again = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "--fast", "--dir", str(demo)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("exists, skipped") == 2
    assert "training already finished" in again.stderr
    assert "up to date" in again.stderr
