"""slurm/train.sh and slurm/extract.sh under fake Slurm: tiny srun/scontrol/sbatch/accelerate/
nvidia-smi shims on PATH record what the scripts would run on a real cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO / "slurm" / "train.sh"
EXTRACT_SH = REPO / "slurm" / "extract.sh"
JOB_ID = 4242

# srun: one copy of the command per node, like `--ntasks-per-node=1`; forwards USR1/TERM to the
# tasks as the real srun does, and returns the worst task status.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [ $# -gt 0 ] && [[ "$1" == -* ]]; do shift; done
pids=()
interrupted=0
forward() { interrupted=1; for p in "${pids[@]}"; do kill "-$1" "$p" 2>/dev/null || true; done; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
worst=0
for p in "${pids[@]}"; do
  while :; do
    interrupted=0
    rc=0
    wait "$p" || rc=$?
    [ "$interrupted" -eq 1 ] || break
  done
  [ "$rc" -le "$worst" ] || worst=$rc
done
exit "$worst"
"""

# scontrol: `show hostnames gpu-[01-02]` expands a simple bracket range; `requeue ID` is recorded.
FAKE_SCONTROL = r"""#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames")
    list="$3"
    if [[ "$list" =~ ^(.*)\[(.*)\]$ ]]; then
      prefix="${BASH_REMATCH[1]}"
      IFS=, read -ra parts <<< "${BASH_REMATCH[2]}"
      for part in "${parts[@]}"; do
        if [[ "$part" == *-* ]]; then
          first="${part%-*}"; last="${part#*-}"
          for ((n = 10#$first; n <= 10#$last; n++)); do printf "%s%0${#first}d\n" "$prefix" "$n"; done
        else
          echo "$prefix$part"
        fi
      done
    else
      echo "$list"
    fi ;;
  requeue*) echo "requeue $2" >> "$FAKE_LOG_DIR/scontrol.log" ;;
  *) echo "fake scontrol: unsupported $*" >&2; exit 1 ;;
esac
"""

# sbatch: reads the script's #SBATCH lines (command-line options win), exports the SLURM_* a job
# sees, and runs the script in the foreground.
FAKE_SBATCH = r"""#!/usr/bin/env bash
options=()
while [[ "$1" == --* ]]; do options+=("$1"); shift; done
script="$1"; shift
mapfile -t directives < <(sed -n 's/^#SBATCH[[:space:]]\{1,\}//p' "$script")
nodes=1; gpus=""; name="$(basename "$script")"
for option in "${directives[@]}" "${options[@]}"; do
  case "$option" in
    --nodes=*) nodes="${option#*=}" ;;
    --gpus-per-node=*) gpus="${option#*=}" ;;
    --job-name=*) name="${option#*=}" ;;
    --cpus-per-task=*) export SLURM_CPUS_PER_TASK="${option#*=}" ;;
  esac
done
export SLURM_JOB_ID="${FAKE_JOB_ID}" SLURM_JOB_NAME="$name" SLURM_NNODES="$nodes"
export SLURM_SUBMIT_DIR="$PWD" SLURM_GPUS_ON_NODE="$gpus"
if [ "$nodes" -eq 1 ]; then SLURM_JOB_NODELIST=gpu-01; else SLURM_JOB_NODELIST="gpu-[01-$(printf %02d "$nodes")]"; fi
export SLURM_JOB_NODELIST
exec bash "$script" "$@"
"""

# accelerate: records its argv and Slurm environment (one JSON line a call), then behaves as
# FAKE_ACCELERATE_MODE says: ok | fail | wait_preempt (a trainer that checkpoints on PREEMPT).
FAKE_ACCELERATE = r"""#!/usr/bin/env bash
run_dir=""
for arg in "$@"; do case "$arg" in run.dir=*) run_dir="${arg#run.dir=}" ;; esac; done
preempt_at_start=false
[ -n "$run_dir" ] && [ -e "$run_dir/PREEMPT" ] && preempt_at_start=true
"$FAKE_PYTHON" - "$@" <<EOF
import json, os, sys
line = json.dumps({"argv": sys.argv[1:], "node_id": os.environ.get("SLURM_NODEID"),
                   "srun_cpus": os.environ.get("SRUN_CPUS_PER_TASK"),
                   "cwd": os.getcwd(), "preempt_at_start": "$preempt_at_start" == "true"}) + "\\n"
# One write to an O_APPEND file: the nodes' lines never interleave (print under
# PYTHONUNBUFFERED=1 writes the text and the newline separately).
fd = os.open(os.path.join(os.environ["FAKE_LOG_DIR"], "accelerate.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, line.encode())
os.close(fd)
EOF
case "${FAKE_ACCELERATE_MODE:-ok}" in
  ok) exit 0 ;;
  fail) exit 3 ;;
  wait_preempt)
    deadline=$((SECONDS + 20))
    until [ -e "$run_dir/PREEMPT" ] || [ -e "$run_dir/checkpointed" ]; do
      [ "$SECONDS" -lt "$deadline" ] || exit 99
      sleep 0.05
    done
    touch "$FAKE_LOG_DIR/preempt_seen"
    if [ "$SLURM_NODEID" = 0 ]; then
      touch "$run_dir/checkpointed"
      rm -f "$run_dir/PREEMPT"
      echo "preempted"
    fi
    exit 0 ;;
esac
"""

FAKE_NVIDIA_SMI = r"""#!/usr/bin/env bash
for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: Fake GPU (UUID: GPU-$i)"; done
"""


@pytest.fixture
def cluster(tmp_path: Path) -> dict:
    """A submit directory (launch/ and a recipe) plus fake Slurm tools first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "sbatch": FAKE_SBATCH,
             "accelerate": FAKE_ACCELERATE, "nvidia-smi": FAKE_NVIDIA_SMI}
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    submit = tmp_path / "repo"
    (submit / "recipes").mkdir(parents=True)
    (submit / "recipes" / "tiny.py").write_text("config = {}\n")
    (submit / "launch").symlink_to(REPO / "launch")
    (submit / "slurm").symlink_to(REPO / "slurm")
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_LOG_DIR=str(logs), FAKE_PYTHON=sys.executable,
               FAKE_JOB_ID=str(JOB_ID), HOME=str(tmp_path))
    env.pop("VIRTUAL_ENV", None)
    return {"submit": submit, "logs": logs, "env": env}


def _direct_env(cluster: dict, nodes: int, gpus: int | None, **extra: str) -> dict:
    """The environment of a job started without the fake sbatch."""
    env = dict(cluster["env"])
    env.update(SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NAME="direct", SLURM_NNODES=str(nodes),
               SLURM_SUBMIT_DIR=str(cluster["submit"]),
               SLURM_JOB_NODELIST="node-[07-08]" if nodes > 1 else "node-07")
    if gpus is not None:
        env["SLURM_GPUS_ON_NODE"] = str(gpus)
    env.update(extra)
    return env


def _calls(cluster: dict) -> list[dict]:
    log = cluster["logs"] / "accelerate.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _requeues(cluster: dict) -> list[str]:
    log = cluster["logs"] / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _sbatch(cluster: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = dict(cluster["env"], **extra)
    return subprocess.run(["sbatch", *args], cwd=cluster["submit"], env=env, capture_output=True,
                          text=True, timeout=10)


def test_single_node_starts_one_launcher_with_one_process_per_gpu(cluster: dict) -> None:
    result = _sbatch(cluster, "--gpus-per-node=4", "slurm/train.sh", "recipes/tiny.py")
    assert result.returncode == 0, result.stderr
    (call,) = _calls(cluster)
    argv = call["argv"]
    assert argv[0] == "launch"
    assert _option(argv, "--machine_rank") == "0"
    assert _option(argv, "--num_machines") == "1"
    assert _option(argv, "--num_processes") == "4"
    assert _option(argv, "--config_file") == "launch/multi_gpu.yaml"
    assert "recipes/tiny.py" in argv
    run_dir = f"runs/jaguar-train-{JOB_ID}"  # the #SBATCH job name, kept on requeue
    assert argv[-2:] == [f"run.dir={run_dir}", "train.resume=auto"]
    assert Path(call["cwd"]) == cluster["submit"]
    assert call["srun_cpus"] == "64"  # the #SBATCH --cpus-per-task reaches the srun task
    assert (cluster["submit"] / run_dir).is_dir()
    assert _requeues(cluster) == []


def test_two_nodes_share_one_rendezvous(cluster: dict) -> None:
    result = _sbatch(cluster, "--nodes=2", "--gpus-per-node=4", "--job-name=eva", "slurm/train.sh",
                     "recipes/tiny.py", "optim.lr=0.001", "data.p_identities=4", SHARDS="data/shards")
    assert result.returncode == 0, result.stderr
    calls = _calls(cluster)
    assert len(calls) == 2
    assert sorted(_option(c["argv"], "--machine_rank") for c in calls) == ["0", "1"]
    assert sorted(c["node_id"] for c in calls) == ["0", "1"]
    for call in calls:
        argv = call["argv"]
        assert _option(argv, "--main_process_ip") == "gpu-01"
        assert _option(argv, "--num_machines") == "2"
        assert _option(argv, "--num_processes") == "8"
        assert _option(argv, "--config_file") == "launch/multi_node.yaml"
        assert argv[argv.index("recipes/tiny.py") + 1:] == [
            "optim.lr=0.001", "data.p_identities=4", f"run.dir=runs/eva-{JOB_ID}", "train.resume=auto",
            "data.shards=data/shards"]
    ports = {_option(c["argv"], "--main_process_port") for c in calls}
    assert len(ports) == 1 and 1024 < int(ports.pop()) < 65536


def test_gpu_count_falls_back_to_nvidia_smi_and_run_dir_override_wins(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=1, gpus=None, FAKE_GPUS="2")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py", "run.dir=runs/mine"],
                            cwd=cluster["submit"], env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    (call,) = _calls(cluster)
    assert _option(call["argv"], "--num_processes") == "2"
    assert [a for a in call["argv"] if a.startswith("run.dir=")] == ["run.dir=runs/mine"]


def test_yaml_config_goes_through_jaguar_train(cluster: dict) -> None:
    (cluster["submit"] / "exp.yaml").write_text("train:\n  epochs: 1\n")
    env = _direct_env(cluster, nodes=1, gpus=1)
    result = subprocess.run(["bash", str(TRAIN_SH), "exp.yaml"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    (call,) = _calls(cluster)
    argv = call["argv"]
    assert _option(argv, "--config_file") == "launch/single_gpu.yaml"
    assert argv[argv.index("-m"):argv.index("-m") + 4] == ["-m", "jaguar.cli.main", "train", "exp.yaml"]


def test_preemption_checkpoints_then_requeues(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=2, gpus=2, FAKE_ACCELERATE_MODE="wait_preempt")
    process = subprocess.Popen(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 8
        while len(_calls(cluster)) < 2:  # both launchers running: the job is in training
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the fake launchers never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)
        stdout, stderr = process.communicate(timeout=8)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    run_dir = cluster["submit"] / "runs" / f"direct-{JOB_ID}"
    assert (cluster["logs"] / "preempt_seen").exists()  # the trainer saw RUN_DIR/PREEMPT
    assert (run_dir / "checkpointed").exists()
    assert _requeues(cluster) == [f"requeue {JOB_ID}"]
    assert "preempted" in stdout


def test_normal_finish_does_not_requeue_and_clears_a_stale_preempt(cluster: dict) -> None:
    run_dir = cluster["submit"] / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "PREEMPT").touch()  # left by a job killed before its trainer saw it
    env = _direct_env(cluster, nodes=1, gpus=2, RUN_DIR="runs/old")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    (call,) = _calls(cluster)
    assert call["preempt_at_start"] is False
    assert "run.dir=runs/old" in call["argv"]
    assert _requeues(cluster) == []


def test_training_failure_status_is_propagated(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=1, gpus=2, FAKE_ACCELERATE_MODE="fail")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 3
    assert _requeues(cluster) == []


@pytest.mark.parametrize("args, message", [
    (["recipes/missing.py"], "recipe 'recipes/missing.py' not found"),
    (["recipes/tiny.py", "train.resume=none"], "train.resume=none"),
])
def test_bad_arguments_fail_before_launching(cluster: dict, args: list[str], message: str) -> None:
    env = _direct_env(cluster, nodes=1, gpus=2)
    result = subprocess.run(["bash", str(TRAIN_SH), *args], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert message in result.stderr
    assert _calls(cluster) == []


def test_default_recipe_missing_is_a_clear_error(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=1, gpus=2)
    result = subprocess.run(["bash", str(TRAIN_SH), "optim.lr=0.1"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "recipes/eva02_large.py" in result.stderr
    assert _calls(cluster) == []


def test_no_gpus_is_a_clear_error(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=1, gpus=None, FAKE_GPUS="0")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "--gpus-per-node" in result.stderr


def test_extract_runs_jaguar_extract_on_every_node(cluster: dict) -> None:
    (cluster["submit"] / "runs" / "r1").mkdir(parents=True)
    result = _sbatch(cluster, "--nodes=2", "--gpus-per-node=2", "slurm/extract.sh", "runs/r1",
                     "--split", "test")
    assert result.returncode == 0, result.stderr
    calls = _calls(cluster)
    assert sorted(_option(c["argv"], "--machine_rank") for c in calls) == ["0", "1"]
    for call in calls:
        argv = call["argv"]
        assert _option(argv, "--num_processes") == "4"
        assert argv[argv.index("-m"):] == ["-m", "jaguar.cli.main", "extract", "runs/r1", "--split", "test"]


@pytest.mark.parametrize("args, message", [([], "no run directory given"),
                                           (["runs/nope"], "run directory 'runs/nope' not found")])
def test_extract_needs_an_existing_run_dir(cluster: dict, args: list[str], message: str) -> None:
    env = _direct_env(cluster, nodes=1, gpus=1)
    result = subprocess.run(["bash", str(EXTRACT_SH), *args], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert message in result.stderr
    assert _calls(cluster) == []
