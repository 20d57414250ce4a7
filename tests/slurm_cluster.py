"""A real 2-node Slurm cluster on this host for the tests: munged, slurmctld and two slurmd (nodes n1
and n2) started from a temporary folder, the same Slurm a site runs (Debian's 22.05 in CI).

Both nodes run on this machine (`NodeHostname` is this host, one `slurmd -N NAME` each with its own
port), so a 2-node job is two processes here that find each other through `n1` exactly as on a
cluster.  Everything lives under the folder given to `start` (config, state, spool, munge key and
socket, logs); `stop` ends the daemons by process id.  Needs root (slurmd starts jobs as the
submitting user) and the packages `slurmctld slurmd slurm-client munge` (`.ci/run` installs them);
where either is missing the tests that need the cluster are skipped with that reason (under CI they
fail).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("n1", "n2")
HOSTS_FILE = Path("/etc/hosts")
SBIN = ("/usr/sbin", "/usr/local/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge (as .ci/run does)"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine; the message says why and what would fix it."""


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) pointed at this cluster, without the SLURM_*
        variables of any job the tests themselves might run in."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *command: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (`sbatch`, `scontrol`, ...) against this cluster."""
        result = subprocess.run(list(command), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}"
                               f"\n{self.logs_tail()}")
        return result

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once Slurm forgot it."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job has ended (COMPLETED, FAILED, ...) and return its record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                        "BOOT_FAIL", "DEADLINE", "PREEMPTED"}:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s"
                           f"\n{self.logs_tail()}")

    def logs_tail(self, lines: int = 15) -> str:
        """The end of every daemon log, for a failure message."""
        parts = []
        for log in sorted(self.root.glob("log/*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left of the jobs, then end the daemons (slurmd, slurmctld, munged) by pid."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                queue = self.run("squeue", "-h", "-o", "%i", check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.2)
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


def _tool(name: str) -> str:
    path = shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)
    if path is None:
        raise SlurmUnavailable(f"`{name}` not found: {INSTALL_HINT}")
    return path


def _free_ports(count: int, consecutive: int) -> list[int]:
    """`count` free TCP ports, the last `consecutive` of them adjacent (slurmd's Port=[A-B] range)."""
    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                return False
        return True

    base = 20000 + os.getpid() % 20000
    ports: list[int] = []
    port = base
    while len(ports) < count - consecutive:
        if free(port):
            ports.append(port)
        port += 1
    while True:
        run = list(range(port, port + consecutive))
        if all(free(p) for p in run):
            return ports + run
        port += consecutive


def _resolve_node_names() -> None:
    """n1 and n2 must resolve on this host: the jobs use the first node name as the rendezvous address."""
    missing = []
    for name in NODES:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        # Appended once: the names resolve afterwards, so a second session finds them.
        with HOSTS_FILE.open("a") as hosts:
            hosts.write(f"127.0.0.1 {' '.join(missing)}  # jaguar tests: 2-node Slurm cluster on this host\n")


def _conf_text(root: Path, host: str, ctld_port: int, node_ports: list[int], cpus: int) -> str:
    return "\n".join([
        "ClusterName=jaguartest",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire is also how long a requeued job waits before it may start again (default 120 s).
        f"AuthInfo=socket={root}/munge/munge.socket,cred_expire=10",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        # No cgroups in a container: processes are tracked by parent pid, tasks are not bound.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "SlurmdTimeout=60",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=300",  # finished jobs stay visible to `scontrol show job` for the tests
        f"NodeName=n[1-2] NodeHostname={host} Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def start_cluster(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd n1/n2 under `root`; return once both nodes are idle.

    Raises SlurmUnavailable when this machine cannot run them (not root, packages missing), and
    RuntimeError, with the daemons' logs, when they are installed but fail to start.
    """
    if os.geteuid() != 0:
        raise SlurmUnavailable("a Slurm cluster needs root (slurmd starts jobs as their user); run the suite as root")
    paths = {name: _tool(name) for name in DAEMONS + CLIENTS}
    _resolve_node_names()
    root = Path(root)
    for sub in ("munge", "state", "spool/n1", "spool/n2", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = _free_ports(3, consecutive=2)
    conf = root / "slurm.conf"
    conf.write_text(_conf_text(root, host, ctld_port, node_ports, os.cpu_count() or 1))
    cluster = SlurmCluster(root=root, conf=conf)
    devnull = subprocess.DEVNULL
    try:
        cluster.processes["munged"] = subprocess.Popen(
            [paths["munged"], "--foreground", "--force", f"--socket={root}/munge/munge.socket",
             f"--key-file={key}", f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
             f"--seed-file={root}/munge/munged.seed"], stdout=devnull, stderr=devnull)
        deadline = time.monotonic() + timeout
        while not (root / "munge" / "munge.socket").exists():
            if cluster.processes["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{cluster.logs_tail()}")
            time.sleep(0.05)
        env = cluster.env()
        cluster.processes["slurmctld"] = subprocess.Popen(
            [paths["slurmctld"], "-D", "-i", "-f", str(conf)], env=env, stdout=devnull, stderr=devnull)
        for node in NODES:
            cluster.processes[f"slurmd-{node}"] = subprocess.Popen(
                [paths["slurmd"], "-D", "-N", node, "-f", str(conf)], env=env, stdout=devnull, stderr=devnull)
        while True:
            dead = [name for name, p in cluster.processes.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited at start:\n{cluster.logs_tail()}")
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split("\n")
            if sum(line.split()[1:] == ["idle"] for line in states if line.strip()) == len(NODES):
                return cluster
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states}\n{cluster.logs_tail()}")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """The 2-node cluster for the whole session. Where Slurm cannot run the test is skipped with the
    reason, except under CI (CI=true, set by .ci/run, which installs Slurm), where it fails."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as err:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"no Slurm cluster: {err}; CI needs it", pytrace=False)
        pytest.skip(f"no Slurm cluster: {err}")
    try:
        yield cluster
    finally:
        cluster.stop()
