"""What a user relies on when files are shared, damaged, written twice at once or fill the disk: no
code runs from a checkpoint, one writer a run folder or gallery, corruption named, spreadsheet-safe
cells, a full disk named, killed writers' leftovers removed, problem lists capped, tiny pair lists."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jaguar import checksums
from jaguar.cli.main import main
from jaguar.data.manifest import Manifest, ShardsError
from jaguar.formats import capped_listing, read_identify, read_pairs, spreadsheet_cell, write_identify
from jaguar.io import WriteError, atomic_directory, atomic_write_bytes, atomic_write_text
from jaguar.lock import LockError, WriterLock
from jaguar.core.features import FeatureFileError, FeatureSet
from jaguar.run import RunDir
from jaguar.core.weights import CheckpointError, load_weights, verify_checkpoint
from jaguar.run_checkpoints import EXTRA_STATE_FILE, STATE_FILE, WEIGHTS_FILE
from jaguar.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
FORMULAS = ["=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tTab", "\rCR", "'quoted",
            "plain.png"]


class _Payload:
    """Unpickling this creates the file `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _features(names: list[str], seed: int = 0) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.nn.functional.normalize(torch.randn(len(names), 16, generator=generator), dim=1)
    return FeatureSet(names, embeddings, torch.arange(len(names)) % 3, {0: "a", 1: "b", 2: "c"})


def _checkpoint(folder: Path, extra_state: dict | None = None) -> Path:
    """A checkpoint folder as save_checkpoint leaves it (without a model run): weights, jaguar's own
    state, trainer_state.json with every file's checksum and this account's signature."""
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(folder / WEIGHTS_FILE))
    torch.save(extra_state or {"scheduler": {"t": 3}}, folder / EXTRA_STATE_FILE)
    records = checksums.folder_records(folder)
    (folder / STATE_FILE).write_text(json.dumps({"step": 1, "files": records,
                                                      "signature": checksums.sign(records)}))
    return folder


class _State:
    def __init__(self) -> None:
        self.loaded = None

    def load_state_dict(self, state) -> None:
        self.loaded = state


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("JAGUAR_KEY_FILE", str(tmp_path / "key" / "signing.key"))


# ---------------------------------------------------------------------------------- no pickle


def test_a_pickle_placed_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    folder = _checkpoint(tmp_path / "step-000001")
    assert verify_checkpoint(folder) == []
    ckpt.check_resumable(folder, deepspeed=True)  # signed here, unchanged
    marker = tmp_path / "pwned"
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"custom_checkpoint_0\.pkl: not written by jaguar"):
        ckpt.check_resumable(folder, deepspeed=False)
    assert not marker.exists()


def test_a_payload_with_matching_checksums_is_still_read_as_data_only(tmp_path):
    marker = tmp_path / "pwned"
    folder = _checkpoint(tmp_path / "step-000001", {"scheduler": _Payload(marker)})  # consistent records
    ckpt.check_resumable(folder, deepspeed=False)
    with pytest.raises(CheckpointError, match=f"{EXTRA_STATE_FILE} could not be read as tensors"):
        ckpt.load_extra_state(folder, {"scheduler": _State()})
    assert not marker.exists()
    state = _State()
    ckpt.load_extra_state(_checkpoint(tmp_path / "good"), {"scheduler": state})
    assert state.loaded == {"t": 3}


def test_deepspeed_resume_needs_this_accounts_signature(tmp_path, monkeypatch):
    folder = _checkpoint(tmp_path / "step-000001")
    monkeypatch.setenv("JAGUAR_KEY_FILE", str(tmp_path / "someone-else.key"))
    ckpt.check_resumable(folder, deepspeed=False)  # intact: DDP reads it without unpickling code
    with pytest.raises(CheckpointError, match="not written by jaguar under this account"):
        ckpt.check_resumable(folder, deepspeed=True)


# ---------------------------------------------------------------------------------- corruption


def _flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flips_in_weights_features_and_manifest_are_named(tmp_path, shards_dir):
    folder = _checkpoint(tmp_path / "run" / "checkpoints" / "step-000001")
    weights = folder / WEIGHTS_FILE
    _flip_bit(weights, weights.stat().st_size - 10)  # in the tensor data, rewritten: mtime moves
    model = torch.nn.Linear(1, 1)
    with pytest.raises(CheckpointError, match=f"{weights}: sha256 .* corrupt or was changed"):
        load_weights(model, folder)
    assert any(str(weights) in problem for problem in verify_checkpoint(folder))

    features = tmp_path / "test.safetensors"
    _features([f"img{i}.png" for i in range(20)]).save(features)
    _flip_bit(features, features.stat().st_size - 7)
    with pytest.raises(FeatureFileError, match="does not match the checksum"):
        FeatureSet.load(features)

    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    manifest = json.loads(Manifest.path(shards).read_text())
    manifest["splits"]["train"]["samples"][0]["label"] = (manifest["splits"]["train"]["samples"][0]["label"] + 1) % 6
    Manifest.path(shards).write_text(json.dumps(manifest))
    with pytest.raises(ShardsError, match="was changed since `jaguar prep` wrote it"):
        Manifest.load(shards)


def test_non_finite_embeddings_are_refused_where_features_are_loaded(tmp_path):
    features = _features(["a.png", "b.png", "c.png"])
    features.embeddings[1, 3] = float("inf")
    features.save(tmp_path / "f.safetensors")
    with pytest.raises(FeatureFileError, match=r"non-finite embeddings in 1 row\(s\), e.g. \['b.png'\]"):
        FeatureSet.load(tmp_path / "f.safetensors")


def test_truncated_weights_name_the_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"weights file {weights} could not be read"):
        load_weights(torch.nn.Linear(1, 1), weights)
    folder = _checkpoint(tmp_path / "step-000002")
    (folder / WEIGHTS_FILE).write_bytes((folder / WEIGHTS_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="100 bytes, .* when it was written \\(truncated"):
        load_weights(torch.nn.Linear(1, 1), folder)


def test_verify_run_checks_checkpoints_features_and_gallery(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    folder = _checkpoint(run.checkpoints_dir / "step-000001")
    run.save_features("test", _features([f"t{i}.png" for i in range(8)]))
    run.save_enrolled(_features(["e0.png", "e1.png"], seed=1))
    assert main(["verify", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step-000001" in out and "features of test (8 rows)" in out and "gallery (2 rows)" in out
    weights = folder / WEIGHTS_FILE
    stat = weights.stat()
    _flip_bit(weights, stat.st_size - 10)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the hash tells
    assert main(["verify", str(run.path)]) == 2
    assert f"{weights}: sha256" in capsys.readouterr().err


def test_extract_recomputes_a_features_file_that_fails_its_check(tmp_path):
    from jaguar.retrieval.blockwork import reads_back

    path = tmp_path / "val.safetensors"
    _features([f"v{i}.png" for i in range(10)]).save(path)
    assert reads_back(path, FeatureSet.load)
    _flip_bit(path, path.stat().st_size - 3)
    assert not reads_back(path, FeatureSet.load)


def test_a_damaged_png_in_a_shard_names_the_shard_and_the_sample(tmp_path, shards_dir):
    from jaguar.data.shards import ShardSplit

    shards = tmp_path / "shards"
    shutil.copytree(shards_dir, shards)
    split = ShardSplit(shards, "train")
    shard = shards / Manifest.load(shards).splits["train"].shards[1].url
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data:member.offset_data + member.size] = b"\0" * member.size  # same size: not a PNG
    shard.write_bytes(bytes(data))
    first = Manifest.load(shards).splits["train"].shards[0].nsamples
    with pytest.raises(ShardsError, match=f"sample {first} .* in shard {shard}: its .png member cannot be decoded"):
        split.read_rgba(first)


# ---------------------------------------------------------------------------------- one writer


_HOLDER = """
import sys, time
from jaguar.run import RunDir
lock = RunDir(sys.argv[1]).writer_lock("jaguar train", create=True).acquire()
print("held", flush=True)
time.sleep(60)
"""


def _hold_lock(run: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_refuses_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.save_features("test", _features([f"t{i}.png" for i in range(6)]))
    holder = _hold_lock(run.path)
    try:
        with pytest.raises(LockError, match=f"run folder {run.path} is being written by jaguar train "
                                            f"\\(pid {holder.pid} on host"):
            run.writer_lock("jaguar rank").acquire()
        assert main(["rank", str(run.path), "--split", "test", "--top-k", "2"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err and not run.ranks_path("test").exists()
        for command in (["diagnose", str(run.path), "--split", "test"], ["export", str(run.path)]):
            assert main(command) == 2  # every writer of the run takes its lock, the new stages too
            assert f"being written by jaguar train (pid {holder.pid}" in capsys.readouterr().err
        # readers never block
        assert len(run.load_features("test")) == 6
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: the next writer goes ahead
    assert main(["rank", str(run.path), "--split", "test", "--top-k", "2"]) == 0
    assert run.ranks_path("test").is_file()


def test_a_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    first = run.writer_lock("jaguar report").acquire()
    waiter = WriterLock(run.lock_path, "run", "jaguar rank", wait=0.3)
    start = time.monotonic()
    with pytest.raises(LockError):
        waiter.acquire()
    assert time.monotonic() - start >= 0.3
    first.release()
    with WriterLock(run.lock_path, "run", "jaguar rank", wait=0.3):
        assert json.loads(run.lock_path.read_text())["command"] == "jaguar rank"
    assert run.lock_path.read_text() == ""  # released: no holder recorded


def test_without_flock_a_dead_holder_on_this_host_is_stale(tmp_path, monkeypatch):
    import fcntl
    import socket

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "jaguar train"}))
    with WriterLock(path, "run", "jaguar extract"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "jaguar train"}))
    with pytest.raises(LockError, match=f"jaguar train \\(pid {os.getppid()}"):
        WriterLock(path, "run", "jaguar extract").acquire()


# ---------------------------------------------------------------------------------- CSV cells


def test_formula_cells_are_inert_in_identify_and_rank_csvs_and_read_back_exactly(tmp_path):
    from jaguar.retrieval.rank import write_ranks

    rows = [(name, 1, name, 0.5, f"known: {name}") for name in FORMULAS]
    write_identify(tmp_path / "identify.csv", rows)
    with open(tmp_path / "identify.csv", newline="") as handle:
        cells = [cell for row in list(csv.reader(handle))[1:] for cell in (row[0], row[2])]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert read_identify(tmp_path / "identify.csv") == rows

    names = FORMULAS
    index = torch.tensor([[(i + 1) % len(names)] for i in range(len(names))])
    write_ranks(tmp_path / "ranks.csv", names, index, torch.zeros(len(names), 1), fmt="csv")
    with open(tmp_path / "ranks.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["query"] for row in table] == [spreadsheet_cell(name) for name in names]
    assert not [row for row in table if row["gallery"][:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_the_challenge_files_are_written_as_they_are(tmp_path):
    from jaguar.formats import read_submission, write_submission

    write_submission(tmp_path / "s.csv", ["-1", "=2"], [0.25, 0.5])
    assert (tmp_path / "s.csv").read_text() == "row_id,similarity\n-1,0.25\n=2,0.5\n"
    assert read_submission(tmp_path / "s.csv").row_ids == ["-1", "=2"]


# ---------------------------------------------------------------------------------- full disk, leftovers


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_full_disk_is_named_with_the_free_space_and_what_was_kept(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        target = disk / "test.safetensors"
        atomic_write_bytes(target, b"old")
        with pytest.raises(WriteError, match=f"could not write {target}: disk full on {disk} \\(.* free\\); "
                                             f"the earlier test.safetensors is kept"):
            _features([f"i{i}.png" for i in range(20000)]).save(target)
        assert target.read_bytes() == b"old" and sorted(p.name for p in disk.iterdir()) == ["test.safetensors"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_refused_write_is_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'x.json'}: permission denied"):
        atomic_write_text(tmp_path / "x.json", "{}")


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    from jaguar.io import _owner_tag

    host = _owner_tag().rsplit("-", 1)[0]
    dead_dir = tmp_path / f".OUT.{host}-{killed.pid}.abc123.partial"
    dead_dir.mkdir()
    (dead_dir / "train-000000.tar").write_bytes(b"x" * 100)
    live_dir = tmp_path / f".OUT.{host}-{os.getppid()}.def456.partial"  # a writer still running
    live_dir.mkdir()
    other_host = tmp_path / f".OUT.elsewhere-{killed.pid}.ghi789.partial"
    other_host.mkdir()
    dead_file = tmp_path / f".ranks_test.csv.{host}-{killed.pid}.xyz.tmp"
    dead_file.write_text("half")
    with atomic_directory(tmp_path / "OUT") as tmp:
        (tmp / "done").write_text("ok")
    atomic_write_text(tmp_path / "ranks_test.csv", "query,rank\n")
    assert not dead_dir.exists() and not dead_file.exists()
    assert live_dir.exists() and other_host.exists()


def test_long_problem_listings_are_capped_and_written_in_full(tmp_path):
    lines = [f"train/missing_{i}.png: missing" for i in range(1000)]
    text = capped_listing(lines, limit=20, full_list=tmp_path / "problems.txt")
    assert len(text.splitlines()) == 21 and "... and 980 more (all 1000 in" in text
    assert (tmp_path / "problems.txt").read_text().splitlines() == lines


def test_prep_with_many_missing_files_lists_the_first_and_writes_the_rest(tmp_path):
    from jaguar.data.prep import PrepError, prepare

    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "train.csv").write_text("filename,ground_truth\n" + "".join(f"m{i}.png,A\n" for i in range(500)))
    with pytest.raises(PrepError) as raised:
        prepare(src, tmp_path / "out", workers=1)
    assert len(str(raised.value).splitlines()) < 30 and "480 more" in str(raised.value)
    assert len((tmp_path / "out.problems.txt").read_text().splitlines()) == 500
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- submit


def test_submit_on_a_tiny_pair_list_with_re_ranking_falls_back_and_reports_repeats(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    embedding = torch.nn.functional.normalize(torch.ones(1, 16), dim=1)
    run.save_features("test", FeatureSet(["a.png", "b.png"], embedding.repeat(2, 1), torch.tensor([-1, -1])))
    (run.path / "config.yaml").unlink(missing_ok=True)
    from jaguar.config import PostConfig
    from jaguar.run import PostResult

    post = PostConfig()
    post.rerank, post.qe_k = True, 1
    run.save_post(PostResult(chosen=post, table=[], val_size=2, searched=False))
    pairs = tmp_path / "test.csv"
    pairs.write_text("row_id,query_image,gallery_image\n1,a.png,b.png\n2,b.png,a.png\n1,a.png,b.png\n")
    assert len(read_pairs(pairs)) == 2
    assert main(["submit", str(run.path), "--test-csv", str(pairs)]) == 0
    captured = capsys.readouterr()
    assert "1 row(s) of" in captured.out and "line(s) 4" in captured.out
    assert run.submission_path.read_text().count("\n") == 3


class _TwoRankAccelerator:
    """Rank 0 of a two-process launch, as save_checkpoint sees it: accelerate's save_state writes this
    rank's files and returns; the other rank's random state lands whenever it gets there, at the
    latest by the next barrier (accelerate 1.16's save_state has none of its own at its end)."""

    is_main_process = True
    mixed_precision = "no"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.pending = model, []
        self.state = type("State", (), {"deepspeed_plugin": None})()

    def wait_for_everyone(self) -> None:
        for write in self.pending:
            write()
        self.pending.clear()

    def save_state(self, folder: str) -> None:
        save_file(self.model.state_dict(), str(Path(folder) / "model.safetensors"))
        (Path(folder) / "random_states_0.pkl").write_bytes(b"rank 0")
        self.pending.append(lambda: (Path(folder) / "random_states_1.pkl").write_bytes(b"rank 1"))

    def get_state_dict(self, model, unwrap: bool = True) -> dict:
        return model.state_dict()


def test_a_checkpoint_records_every_ranks_files_so_it_resumes(tmp_path):
    """The checksums of a checkpoint are recorded once every rank's files are written: the other
    rank's random state is in the records, and the checkpoint passes the resume check."""
    from jaguar.run_checkpoints import CheckpointFolder

    model = torch.nn.Linear(3, 2)
    folder = CheckpointFolder(tmp_path / "checkpoints")
    saved = ckpt.save_checkpoint(_TwoRankAccelerator(model), model, None, folder, "step-000001", {"step": 1},
                                 keep_last=2)
    assert "random_states_1.pkl" in json.loads((saved / STATE_FILE).read_text())["files"]
    ckpt.check_resumable(saved, deepspeed=False)
