"""A real SLURM cluster in a temporary folder, for the tests of slurm/ and sweeps.

Debian's slurm 22.05 and munge packages are fetched with `apt-get download` (cached in
WORLDMODEL_SLURM_DEBS, default ~/.cache/worldmodel/slurm-debs) and unpacked with `dpkg -x`:
nothing is installed system-wide. munged runs with its own key and socket; slurmctld and slurmd
run on free local ports with a generated slurm.conf. `env` is what a shell needs to use the
cluster (PATH with sbatch/srun/scontrol, LD_LIBRARY_PATH, SLURM_CONF); jobs inherit it.

With `nodes` > 1 the one machine hosts several nodes, each its own slurmd (`slurmd -N NAME`) on
its own port. The first node is named after the machine and the others after it (`HOST-2`,
...), which SLURM sorts after it: a job's first node, where its batch script and rank 0 run and
whose name Lightning takes as the main address, is the one name that resolves.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = (
    *("slurmctld", "slurmd", "slurm-client", "slurm-wlm-basic-plugins", "munge", "libmunge2"),
    *("libhwloc15", "liblua5.1-0", "libjwt0", "libb64-0d", "libdbi1", "librrd8", "libfreeipmi17"),
    *("libipmimonitoring6", "freeipmi-common"),
)
LIB = "usr/lib/x86_64-linux-gnu"


class SlurmUnavailable(RuntimeError):
    """The packages cannot be fetched or unpacked here (no apt-get / dpkg, no package mirror)."""


def fetch_packages(cache: Path) -> list[Path]:
    """The .deb files of PACKAGES in `cache`, downloaded once."""
    cache.mkdir(parents=True, exist_ok=True)
    wanted = lambda: [d for p in PACKAGES for d in cache.glob(f"{p}_*.deb")]  # noqa: E731
    if len(wanted()) == len(PACKAGES):
        return wanted()
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise SlurmUnavailable("the local SLURM cluster needs apt-get and dpkg (Debian/Ubuntu)")
    download = ["apt-get", "download", *PACKAGES]
    result = subprocess.run(download, cwd=cache, capture_output=True, text=True)
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = subprocess.run(download, cwd=cache, capture_output=True, text=True)
    if result.returncode != 0:
        raise SlurmUnavailable(f"apt-get download {' '.join(PACKAGES)} failed:\n{result.stderr[-2000:]}")
    return wanted()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalSlurm:
    """`with LocalSlurm(folder) as cluster:` a running cluster of one node with `cpus` CPUs."""

    def __init__(self, root: Path, cpus: int = 2, debs: Path | None = None, nodes: int = 1):
        """`cpus` per node."""
        self.root = Path(root)
        self.cpus = cpus
        self.debs = debs or Path(
            os.environ.get("WORLDMODEL_SLURM_DEBS", Path.home() / ".cache/worldmodel/slurm-debs")
        )
        self.pkg = self.root / "pkg"
        self.processes: list[subprocess.Popen] = []
        self.node = socket.gethostname()
        self.nodes = [self.node, *(f"{self.node}-{i}" for i in range(2, nodes + 1))]

    # -- setup -----------------------------------------------------------------------------
    def _unpack(self) -> None:
        for deb in fetch_packages(self.debs):
            subprocess.run(["dpkg", "-x", str(deb), str(self.pkg)], check=True)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.pkg}/usr/bin:{self.pkg}/usr/sbin:{env.get('PATH', '')}"
        libraries = f"{self.pkg}/{LIB}:{self.pkg}/{LIB}/slurm-wlm"
        env["LD_LIBRARY_PATH"] = (
            f"{libraries}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libraries
        )
        env["SLURM_CONF"] = str(self.root / "slurm.conf")
        return env

    def _write_config(self) -> None:
        for folder in ("munge", "state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        root = self.root
        nodes = "".join(  # every node at 127.0.0.1, each slurmd on its own port
            f"NodeName={node} NodeHostname={self.node} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus} State=UNKNOWN\n"
            for node in self.nodes
        )
        (root / "slurm.conf").write_text(
            f"""ClusterName=worldmodel-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
PluginDir={self.pkg}/{LIB}/slurm-wlm
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
{nodes}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )
        for node in self.nodes:
            (root / "spool" / node).mkdir(parents=True, exist_ok=True)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={self.root}/munge/munge.socket",
            f"--pid-file={self.root}/munge/munged.pid",
            f"--log-file={self.root}/log/munged.log",
            f"--seed-file={self.root}/munge/munged.seed",
        )
        self._wait(lambda: (self.root / "munge" / "munge.socket").exists(), "munged to open its socket")

    def _daemon(self, binary: str, *args: str) -> None:
        path = shutil.which(binary, path=self.env["PATH"])
        with open(self.root / "log" / f"{binary}.out", "ab") as log:  # the daemon keeps its own copy
            self.processes.append(
                subprocess.Popen([path, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT)
            )

    def _wait(self, ready, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}; logs in {self.root}/log")
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}; logs in {self.root}/log")

    def start(self) -> LocalSlurm:
        self._unpack()
        self._write_config()
        self._start_munge()
        self._daemon("slurmctld-wlm", "-D", "-i")
        for node in self.nodes:
            self._daemon("slurmd-wlm", "-D", "-N", node, "-d", str(self.pkg / "usr/sbin/slurmstepd-wlm"))
        self._wait(lambda: self.node_state() == "idle", "the node to become idle")
        return self

    def stop(self) -> None:
        if self.processes:  # cancel what is left, and let its step daemons exit before the cluster goes
            subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).stdout.strip()
            ):
                time.sleep(0.5)
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def __enter__(self) -> LocalSlurm:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use -------------------------------------------------------------------------------
    def run(
        self, *command: str, check: bool = True, extra_env: dict | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """A command (sbatch, squeue, ...) against this cluster; sbatch passes the environment to jobs."""
        env = {**self.env, **(extra_env or {})}
        return subprocess.run(command, env=env, capture_output=True, text=True, check=check, **kwargs)

    def node_state(self) -> str:
        result = self.run("sinfo", "--noheader", "--format=%T", check=False)
        return result.stdout.strip().rstrip("*") if result.returncode == 0 else ""

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, ... (jobs stay listed for MinJobAge after they end)."""
        result = self.run("scontrol", "show", "job", job_id, "--oneliner", check=False)
        for field in result.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return ""

    def job_processes_alive(self, job_id: str) -> bool:
        """Whether a slurmstepd of the job (its batch script or an srun step) still runs on the node."""
        found = subprocess.run(["pgrep", "-f", f"slurmstepd-wlm: \\[{job_id}\\."], capture_output=True)
        return found.returncode == 0

    def job_field(self, job_id: str, name: str) -> str:
        result = self.run("scontrol", "show", "job", job_id, "--oneliner")
        for field in result.stdout.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        raise KeyError(f"job {job_id} has no field {name}: {result.stdout}")

    def wait_for(self, job_id: str, states: set[str], timeout: float) -> str:
        """Wait until the job is in one of `states`; return it. Fails on a terminal state not asked for."""
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            if state in terminal:
                raise AssertionError(f"job {job_id} ended {state}, waiting for {states}")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s")
