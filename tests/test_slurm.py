"""slurm/train.sh and slurm/extract.sh on a real 2-node Slurm cluster (tests/slurm_cluster.py): CPU
training on two nodes, a real preemption that requeues the same job and resumes to the same weights,
a failing job, and extraction on two nodes.  What one machine without GPUs cannot show (GPU counts,
`module load`, the routing of a .yaml config) is checked under fake srun/scontrol/sbatch/accelerate/
nvidia-smi/module shims on PATH that record what the scripts would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (slurm_cluster: the session fixture)

from jaguar.run import RunDir
from jaguar.run_checkpoints import CheckpointFolder, WEIGHTS_FILE, is_complete

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

# scontrol: `show hostnames gpu-[01-02]` expands a simple bracket range.
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

# accelerate: records its argv and Slurm environment (one JSON line a call) and exits 0.
FAKE_ACCELERATE = r"""#!/usr/bin/env bash
"$FAKE_PYTHON" - "$@" <<EOF
import json, os, sys
line = json.dumps({"argv": sys.argv[1:], "node_id": os.environ.get("SLURM_NODEID"),
                   "srun_cpus": os.environ.get("SRUN_CPUS_PER_TASK"),
                   "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                   "omp_threads": os.environ.get("OMP_NUM_THREADS"), "cwd": os.getcwd()}) + "\\n"
# One write to an O_APPEND file: the nodes' lines never interleave (print under
# PYTHONUNBUFFERED=1 writes the text and the newline separately).
fd = os.open(os.path.join(os.environ["FAKE_LOG_DIR"], "accelerate.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, line.encode())
os.close(fd)
EOF
"""

FAKE_NVIDIA_SMI = r"""#!/usr/bin/env bash
for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: Fake GPU (UUID: GPU-$i)"; done
"""

# module: Environment Modules / Lmod; records its arguments.
FAKE_MODULE = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG_DIR/module.log"
"""


@pytest.fixture
def cluster(tmp_path: Path) -> dict:
    """A submit directory (launch/ and a recipe) plus fake Slurm tools first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "sbatch": FAKE_SBATCH,
             "accelerate": FAKE_ACCELERATE, "nvidia-smi": FAKE_NVIDIA_SMI, "module": FAKE_MODULE}
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
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("SLURM_") and key not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
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


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _sbatch(cluster: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    env = dict(cluster["env"], **extra)
    return subprocess.run(["sbatch", *args], cwd=cluster["submit"], env=env, capture_output=True,
                          text=True, timeout=10)


def test_single_node_starts_one_launcher_with_one_process_per_gpu(cluster: dict) -> None:
    result = _sbatch(cluster, "--gpus-per-node=4", "--cpus-per-task=64", "slurm/train.sh", "recipes/tiny.py")
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
    assert call["srun_cpus"] == "64"  # sbatch's --cpus-per-task reaches the srun task
    assert call["cuda_visible"] is None and call["omp_threads"] is None  # GPU runs are left alone
    assert (cluster["submit"] / run_dir).is_dir()


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


def test_device_gpu_without_gpus_is_a_clear_error(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=1, gpus=None, FAKE_GPUS="0", DEVICE="gpu")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "DEVICE=gpu but found no GPUs" in result.stderr and "--gpus-per-node" in result.stderr
    assert _calls(cluster) == []


def test_device_cpu_on_a_gpu_node_hides_the_gpus(cluster: dict) -> None:
    """DEVICE=cpu: the GPUs the node has are hidden, PROCESSES_PER_NODE CPU processes share its cores."""
    env = _direct_env(cluster, nodes=1, gpus=4, DEVICE="cpu", PROCESSES_PER_NODE="2", SLURM_CPUS_PER_TASK="8")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    (call,) = _calls(cluster)
    assert call["cuda_visible"] == ""
    assert call["omp_threads"] == "4"  # 8 cores for 2 processes
    assert _option(call["argv"], "--num_processes") == "2"
    assert _option(call["argv"], "--config_file") == "launch/cpu_2proc.yaml"
    assert "1 node(s) x 2 cpu process(es)" in result.stdout


def test_modules_are_loaded_and_a_missing_module_command_is_a_clear_error(cluster: dict) -> None:
    env = _direct_env(cluster, nodes=1, gpus=1, MODULES="cuda/12.4 gcc/12")
    result = subprocess.run(["bash", str(TRAIN_SH), "recipes/tiny.py"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert (cluster["logs"] / "module.log").read_text().splitlines() == ["load cuda/12.4 gcc/12"]
    (cluster["submit"].parent / "bin" / "module").unlink()
    result = subprocess.run(["bash", str(EXTRACT_SH), "runs"], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "MODULES='cuda/12.4 gcc/12' is set but the `module` command is not available" in result.stderr


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


def test_extract_sh_runs_jaguar_match_with_command_match(cluster: dict) -> None:
    (cluster["submit"] / "runs" / "r1").mkdir(parents=True)
    result = _sbatch(cluster, "--nodes=2", "slurm/extract.sh", "runs/r1", "--split", "val", COMMAND="match")
    assert result.returncode == 0, result.stderr
    calls = _calls(cluster)
    assert sorted(_option(c["argv"], "--machine_rank") for c in calls) == ["0", "1"]
    for call in calls:
        argv = call["argv"]
        assert argv[argv.index("-m"):] == ["-m", "jaguar.cli.main", "match", "runs/r1", "--split", "val"]
    refused = _sbatch(cluster, "slurm/extract.sh", "runs/r1", COMMAND="train")
    assert refused.returncode == 2 and "COMMAND=train: it must be extract or match" in refused.stderr


@pytest.mark.parametrize("args, message", [([], "no run directory given"),
                                           (["runs/nope"], "run directory 'runs/nope' not found")])
def test_extract_needs_an_existing_run_dir(cluster: dict, args: list[str], message: str) -> None:
    env = _direct_env(cluster, nodes=1, gpus=1)
    result = subprocess.run(["bash", str(EXTRACT_SH), *args], cwd=cluster["submit"], env=env,
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert message in result.stderr
    assert _calls(cluster) == []


# ---------------------------------------------------------------------------------- the real cluster
# resnet10t at 32 px on the session's synthetic shards: 2 nodes x 1 process, 15 epochs of 2 steps.
STEPS = 30
TINY_TRAIN = ["model.img_size=[32,32]", "data.p_identities=2", "data.k_images=4", "data.num_workers=0",
              "train.epochs=100", f"train.max_steps={STEPS}", "train.checkpoint_every=3", "train.keep_last=20",
              "train.eval_every=0", "train.log_every=1"]
JOB_TIMEOUT = 600


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A submit directory as users have it (launch/, slurm/, recipes/ and logs/), away from the clone."""
    submit = tmp_path_factory.mktemp("submit")
    for name in ("launch", "slurm", "recipes"):
        (submit / name).symlink_to(REPO / name)
    (submit / "logs").mkdir()
    return submit


def _submit(cluster: SlurmCluster, submit: Path, *args: str) -> int:
    """sbatch from `submit` with this Python's venv; the job inherits this environment (PYTHONPATH too)."""
    env = cluster.env()
    env.update(VENV=sys.prefix, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(["sbatch", "--parsable", *args], cwd=submit, env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().split(";")[0])


def _job_log(submit: Path, name: str, job_id: int) -> str:
    return (submit / "logs" / f"{name}-{job_id}.out").read_text(errors="replace")


def _train(cluster: SlurmCluster, submit: Path, shards: Path, run: str, *extra: str) -> int:
    return _submit(cluster, submit, "--nodes=2", "slurm/train.sh", "recipes/tiny_cpu.py",
                   f"data.shards={shards}", f"run.dir={run}", *TINY_TRAIN, *extra)


@pytest.fixture(scope="module")
def training_jobs(slurm_cluster: SlurmCluster, submit_dir: Path, shards_dir: Path) -> dict:
    """Two identical 2-node training jobs, side by side: "straight" runs uninterrupted (with a PREEMPT
    file left by an earlier job in its run directory, which must not stop it); "preempted" gets the
    USR1 that `#SBATCH --signal=B:USR1@300` sends before a time limit, once it has checkpointed."""
    (submit_dir / "runs" / "straight").mkdir(parents=True)
    RunDir(submit_dir / "runs" / "straight").preempt_flag.touch()
    jobs = {name: _train(slurm_cluster, submit_dir, shards_dir, f"runs/{name}") for name in ("straight", "preempted")}
    # A checkpoint on disk means the trainer is in its loop, well before its last step.
    second = RunDir(submit_dir / "runs" / "preempted").checkpoints_dir / "step-000006"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not is_complete(second):
        state = slurm_cluster.job(jobs["preempted"]).get("JobState")
        assert state in {"PENDING", "RUNNING"}, f"job {state} before its second checkpoint:\n" + _job_log(
            submit_dir, "jaguar-train", jobs["preempted"])[-3000:]
        assert time.monotonic() < deadline, "the job never reached its second checkpoint"
        time.sleep(0.05)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(jobs["preempted"]))
    return {name: {"job": job_id, "info": slurm_cluster.wait_job(job_id, JOB_TIMEOUT),
                   "run": RunDir(submit_dir / "runs" / name), "log": _job_log(submit_dir, "jaguar-train", job_id)}
            for name, job_id in jobs.items()}


def _final_weights(run: RunDir) -> dict[str, torch.Tensor]:
    last = CheckpointFolder(run.checkpoints_dir).steps()[-1]
    assert last.name == f"step-{STEPS:06d}" and is_complete(last)
    return load_file(str(last / WEIGHTS_FILE))


@pytest.mark.slow
def test_two_cpu_nodes_train_to_checkpoints_and_tensorboard_events(training_jobs: dict) -> None:
    job = training_jobs["straight"]
    info, log, run = job["info"], job["log"], job["run"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    assert "on 2 node(s) x 1 cpu process(es): n[1-2]" in log
    assert "accelerate config launch/multi_node.yaml, rendezvous n1:" in log
    assert "world size 2" in log
    assert "training finished" in log
    assert not run.preempt_flag.exists()
    names = [path.name for path in CheckpointFolder(run.checkpoints_dir).steps()]
    assert names == [f"step-{step:06d}" for step in range(3, STEPS + 1, 3)]  # the stale PREEMPT stopped nothing
    _final_weights(run)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tb_dir))
    events.Reload()
    losses = [tag for tag in events.Tags()["scalars"] if "loss" in tag]
    assert losses, events.Tags()["scalars"]
    assert len(events.Scalars(losses[0])) == STEPS  # train.log_every=1


@pytest.mark.slow
def test_preemption_checkpoints_requeues_the_same_job_and_resumes_to_the_same_weights(training_jobs: dict) -> None:
    job = training_jobs["preempted"]
    info, log, run, job_id = job["info"], job["log"], job["run"], job["job"]
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    assert "received SIGUSR1" in log
    assert f"requeueing job {job_id}" in log
    assert f"job {job_id} (restart 1)" in log
    assert "resumed from runs/preempted/checkpoints/step-" in log
    steps = [int(path.name.split("-")[1]) for path in CheckpointFolder(run.checkpoints_dir).steps()]
    assert any(step % 3 for step in steps), f"no checkpoint taken at the preemption: {steps}"
    straight, resumed = _final_weights(training_jobs["straight"]["run"]), _final_weights(run)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{key} differs after preemption and requeue"


@pytest.mark.slow
def test_a_failing_training_job_fails_and_is_not_requeued(slurm_cluster: SlurmCluster, submit_dir: Path) -> None:
    job_id = _submit(slurm_cluster, submit_dir, "slurm/train.sh", "recipes/tiny_cpu.py",
                     f"data.shards={submit_dir / 'no-shards'}", "run.dir=runs/failing", *TINY_TRAIN)
    info = slurm_cluster.wait_job(job_id, JOB_TIMEOUT)
    log = _job_log(submit_dir, "jaguar-train", job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert info["ExitCode"] != "0:0"
    assert "accelerate config launch/cpu_2proc.yaml" in log  # one CPU node
    assert "no-shards" in log  # the trainer's error reaches the job log
    assert "training failed with status" in log and "requeueing" not in log


@pytest.mark.slow
def test_two_node_extraction_equals_one_process(slurm_cluster: SlurmCluster, submit_dir: Path,
                                                training_jobs: dict) -> None:
    one, two = submit_dir / "runs" / "extract-1", submit_dir / "runs" / "extract-2"
    shutil.copytree(training_jobs["straight"]["run"].path, one)
    shutil.copytree(training_jobs["straight"]["run"].path, two)
    job_id = _submit(slurm_cluster, submit_dir, "--nodes=2", "slurm/extract.sh", "runs/extract-2", "--split", "test")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "jaguar.cli.main", "extract", str(one), "--split", "test"],
                            cwd=submit_dir, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    info = slurm_cluster.wait_job(job_id, JOB_TIMEOUT)
    log = _job_log(submit_dir, "jaguar-extract", job_id)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "on 2 node(s) x 1 cpu process(es)" in log
    one_set, two_set = RunDir(one).load_features("test"), RunDir(two).load_features("test")
    assert two_set.meta["world_size"] == 2
    assert one_set.names == two_set.names and len(one_set.names) > 0
    torch.testing.assert_close(one_set.embeddings, two_set.embeddings, rtol=1e-5, atol=1e-5)
