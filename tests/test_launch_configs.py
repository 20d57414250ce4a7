"""launch/*.yaml and launch/deepspeed/*.json: each is read the way `accelerate launch` reads it, and
the CPU DDP config really starts two processes that average their gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
YAMLS = sorted(LAUNCH.glob("*.yaml"))
JSONS = sorted((LAUNCH / "deepspeed").glob("*.json"))
DEEPSPEED_YAMLS = [p for p in YAMLS if "deepspeed_config" in p.read_text()]
EXPECTED_YAMLS = {"single_gpu", "multi_gpu", "zero2", "zero3", "multi_node", "cpu_2proc", "cpu_2proc_zero2"}


def _resolve(yaml_path: Path, *cli: str) -> tuple:
    """The arguments `accelerate launch --config_file yaml_path *cli script.py` ends up with."""
    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), *cli, "script.py"])
    return _validate_launch_command(args)


def test_every_documented_config_exists() -> None:
    assert EXPECTED_YAMLS <= {p.stem for p in YAMLS}
    assert {"zero2", "zero3"} <= {p.stem for p in JSONS}


@pytest.mark.parametrize("yaml_path", YAMLS, ids=lambda p: p.name)
def test_yaml_loads_in_accelerate_without_unknown_keys(yaml_path: Path) -> None:
    config = ClusterConfig.from_yaml_file(str(yaml_path))  # raises on keys accelerate does not know
    assert config.compute_environment.value == "LOCAL_MACHINE"


@pytest.mark.parametrize("json_path", JSONS, ids=lambda p: p.name)
def test_deepspeed_json_leaves_optimizer_and_batch_to_the_trainer(json_path: Path) -> None:
    config = json.loads(json_path.read_text())
    # An optimizer here would make DeepSpeed build its own (and JIT-compile fused_adam).
    assert "optimizer" not in config and "scheduler" not in config
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["zero_optimization"]["stage"] == int(json_path.stem.removeprefix("zero"))
    # accelerate can only fill hidden-size "auto" buckets from a transformers config; timm has none.
    assert "auto" not in json.dumps(config["zero_optimization"])


@pytest.mark.parametrize("yaml_path", DEEPSPEED_YAMLS, ids=lambda p: p.name)
def test_deepspeed_yaml_builds_a_plugin_from_its_json(yaml_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = ClusterConfig.from_yaml_file(str(yaml_path)).deepspeed_config["deepspeed_config_file"]
    assert (REPO / config_file).is_file(), f"{yaml_path.name} names missing {config_file}"
    args, defaults, mixed_precision_from_yaml = _resolve(yaml_path, "--num_processes", "2")
    assert args.use_deepspeed
    # What launch_command does before starting DeepSpeed; accelerate rejects some yaml keys then.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_yaml else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    args.main_process_port = 0  # a free port: a fixed one may be taken by a parallel test
    command, env = prepare_deepspeed_cmd_env(args)
    assert command is None, f"{yaml_path.name} would need a DeepSpeed hostfile: {command}"
    monkeypatch.chdir(REPO)  # the JSON path is relative to the launch directory
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision("bf16")  # what a recipe with train.precision=bf16 asks for
    expected_stage = 3 if "zero3" in config_file else 2
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == expected_stage
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    assert plugin.deepspeed_config["fp16"]["enabled"] is False


def test_multi_gpu_yaml_needs_the_gpu_count_and_uses_bf16() -> None:
    with pytest.raises(ValueError, match="num_processes"):
        _resolve(LAUNCH / "multi_gpu.yaml")
    args, _, _ = _resolve(LAUNCH / "multi_gpu.yaml", "--num_processes", "4")
    assert args.multi_gpu and args.mixed_precision == "bf16"


def test_multi_node_yaml_takes_the_rendezvous_from_the_command_line() -> None:
    args, _, _ = _resolve(LAUNCH / "multi_node.yaml", "--num_machines", "3", "--machine_rank", "2",
                          "--main_process_ip", "gpu-01", "--main_process_port", "19242",
                          "--num_processes", "12")
    env = prepare_multi_gpu_env(args)
    assert args.nproc_per_node == "4" and args.nnodes == "3" and args.node_rank == 2
    assert args.rdzv_endpoint == "gpu-01:19242"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_cpu_2proc_yaml_takes_the_two_process_launcher() -> None:
    args, _, _ = _resolve(LAUNCH / "cpu_2proc.yaml")
    # `--cpu` would route to the single-process launcher; MULTI_GPU + use_cpu goes to torchrun.
    assert args.multi_gpu and not args.cpu and args.use_cpu and args.num_processes == 2


@pytest.mark.parametrize("yaml_name, nodes, gpus", [("single_gpu.yaml", 1, 1), ("multi_gpu.yaml", 1, 4),
                                                     ("multi_node.yaml", 2, 4), ("multi_node_zero2.yaml", 2, 4)])
def test_configs_accept_the_arguments_slurm_train_passes(yaml_name: str, nodes: int, gpus: int) -> None:
    args, _, _ = _resolve(LAUNCH / yaml_name, "--machine_rank", "1" if nodes > 1 else "0",
                          "--num_machines", str(nodes), "--num_processes", str(nodes * gpus),
                          "--main_process_ip", "gpu-01", "--main_process_port", "19242")
    assert args.num_machines == nodes and args.num_processes == nodes * gpus
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        command, _ = prepare_deepspeed_cmd_env(args)
        assert command is None  # torchrun on this node, not a pdsh/ssh launcher
    elif args.multi_gpu:
        prepare_multi_gpu_env(args)
    if nodes > 1:
        assert args.nproc_per_node == str(gpus) and args.rdzv_endpoint == "gpu-01:19242"


def _launch_probe(yaml_path: Path, out_dir: Path, extra_env: dict) -> list[dict]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", **extra_env)
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--config_file", str(yaml_path),
                             str(REPO / "tests" / "dist_probe.py"), str(out_dir), "--train-step"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


@pytest.mark.slow
def test_cpu_2proc_starts_two_gloo_processes_that_share_gradients(tmp_path: Path) -> None:
    # Accelerate does not hand the yaml's use_cpu to torchrun's workers: the variable is required
    # (launch/README.md), unless the script itself passes Accelerator(cpu=True).
    reports = _launch_probe(LAUNCH / "cpu_2proc.yaml", tmp_path, {"ACCELERATE_USE_CPU": "true"})
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["device"] == "cpu"
        assert report["distributed_type"] == "MULTI_CPU"
        assert report["reduced_sum"] == 3.0  # 1 + 2: both processes joined the all-reduce
        assert report["params_in_sync"]  # different batches, same weights: gradients averaged
        assert report["engine"] == "DistributedDataParallel"
