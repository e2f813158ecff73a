"""A real SLURM cluster on this machine for the tests: one ``slurmctld`` and two ``slurmd`` (nodes ``n1``, ``n2``).

The session-scoped fixture :func:`slurm_cluster` installs Debian's SLURM packages if ``slurmctld`` is missing (an
install that fails FAILS the fixture, with apt's output: these tests are never skipped), writes a ``slurm.conf``
into a temporary folder, starts the daemons in the foreground of their own processes (``-D``), waits until
``sinfo`` shows both nodes idle, and exports ``SLURM_CONF`` so that every ``sbatch`` / ``squeue`` / ``scontrol``
the tests run (and every job: sbatch exports the environment) talks to this cluster. At teardown it cancels the
jobs still known, stops every daemon it started (SIGTERM, then SIGKILL, each waited for) and kills the job step
daemons (``slurmstepd``, which detach from ``slurmd``) that carry this cluster's ``SLURM_CONF``: nothing survives
the session.

The setup, and why:

* ``AuthType=auth/none`` + ``CredType=cred/none``: no munge daemon is needed (root, one host).
  ``AuthInfo=cred_expire=5``: a requeued job waits for its old credential to expire before it may start again
  (120 s by default); ``sched_interval=1``: a requeued job whose begin time has passed is started by the next
  periodic scheduling pass, not by an event (60 s apart by default).
* Two ``slurmd`` on one host: distinct ``Port=`` per node, ``NodeHostname=localhost``, and ``slurmd -N NAME``.
  The node names must resolve (the trainer's rendezvous host is the first node of the job): if ``n1`` / ``n2`` do
  not, ``127.0.0.1 n1 n2`` is appended to ``/etc/hosts`` (and the test output says so).
* ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups here.
* ``MinJobAge=3600``: finished jobs stay visible to ``scontrol show job`` for the session (there is no slurmdbd,
  so no ``sacct``).
* ``CPUs=2`` per node, but both nodes share this machine's cores: keep jobs at one task per node and
  ``OMP_NUM_THREADS=1``. A job must ask ``--ntasks-per-node`` explicitly.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

import pytest

NODES = ("n1", "n2")
PACKAGES = ("slurmctld", "slurmd", "slurm-client")
HOSTS_MARK = "# fake SLURM nodes of tests/slurm_cluster.py"

SLURM_CONF = """\
ClusterName=offgrpo-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=15
InactiveLimit=0
SlurmdTimeout=300
NodeName={nodes[0]} NodeHostname=localhost Port={node_ports[0]} CPUs=2 State=UNKNOWN
NodeName={nodes[1]} NodeHostname=localhost Port={node_ports[1]} CPUs=2 State=UNKNOWN
PartitionName=test Nodes={nodes[0]},{nodes[1]} Default=YES MaxTime=INFINITE State=UP
"""


def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_slurm_installed() -> None:
    """Debian's SLURM daemons and clients; ``pytest.fail`` with apt's output when they cannot be installed."""
    if all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "scontrol")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"installing SLURM: {' '.join(cmd)} could not run: {e}", pytrace=False)
        if r.returncode != 0:
            pytest.fail(f"installing SLURM: {' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}"
                        f"\n--- stderr\n{r.stderr[-6000:]}", pytrace=False)
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(t)]
    if missing:
        pytest.fail(f"installed {PACKAGES} but {missing} still not on PATH", pytrace=False)


def ensure_node_names_resolve(nodes: Iterable[str]) -> Optional[str]:
    """Append ``127.0.0.1 <nodes>`` to /etc/hosts for names that do not resolve; returns a note if it did."""
    missing = []
    for name in nodes:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if not missing:
        return None
    try:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  {HOSTS_MARK}\n")
    except OSError as e:
        pytest.fail(f"the fake node names {missing} do not resolve and /etc/hosts is not writable ({e})",
                    pytrace=False)
    return f"note: appended '127.0.0.1 {' '.join(missing)}' to /etc/hosts (fake SLURM node names)"


class SlurmCluster:
    """The running test cluster: its folder, its config, and helpers to submit and watch jobs."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.procs: Dict[str, subprocess.Popen] = {}

    # ---- daemons ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        os.makedirs(os.path.join(self.root, "state"), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(root=self.root, ctld_port=ctld_port, node_ports=node_ports, nodes=NODES))
        env = {**os.environ, "SLURM_CONF": self.conf}
        self._spawn("slurmctld", ["slurmctld", "-D", "-c"], env)
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node], env)
        deadline = time.monotonic() + 60
        while True:
            states = self._node_states()
            if all(states.get(n) == "idle" for n in NODES):
                return
            dead = [name for name, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{dead} exited" if dead else "not idle after 60 s"
                self.stop()
                pytest.fail(f"the test SLURM cluster did not come up ({why}; sinfo: {states})\n{self.daemon_logs()}",
                            pytrace=False)
            time.sleep(0.3)

    def _spawn(self, name: str, cmd: List[str], env: Dict[str, str]) -> None:
        out = open(os.path.join(self.root, f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _node_states(self) -> Dict[str, str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        return dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split()) == 2)

    def stop(self) -> None:
        """Cancel the jobs still known, stop the daemons, kill this cluster's leftover step daemons."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            r = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
            active = r.stdout.split()
            if active:
                self.run(["scancel", *active], check=False, timeout=30)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False,
                                                                 timeout=10).stdout.strip():
                    time.sleep(0.5)
        # slurmd first (their steps end with them), the controller last.
        for name in sorted(self.procs, key=lambda n: n == "slurmctld"):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=20)
        for pid in self.leftover_step_daemons():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_step_daemons(self) -> List[int]:
        """Processes started by this cluster that outlive slurmd (slurmstepd detaches): found by our SLURM_CONF."""
        needle = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for env_file in glob.glob("/proc/[0-9]*/environ"):
            pid = int(env_file.split("/")[2])
            if pid == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(env_file, "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            if cmd.startswith(b"slurmstepd") and needle in environ:
                pids.append(pid)
        return pids

    def daemon_logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted(glob.glob(os.path.join(self.root, "*.log")) + glob.glob(os.path.join(self.root, "*.out"))):
            with open(path, errors="replace") as f:
                parts.append(f"--- {path}\n{f.read()[-tail:]}")
        return "\n".join(parts)

    # ---- clients ---------------------------------------------------------------------------------------------
    def run(self, cmd: List[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        env = {**os.environ, "SLURM_CONF": self.conf, **kw.pop("env", {})}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> int:
        """``sbatch --parsable ARGS``; returns the job id."""
        r = self.run(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, StartTime, ...); {} if unknown."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=30)
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """What ``--signal=B:USR1@T`` does near the time limit: the signal to the batch shell only."""
        self.run(["scancel", f"--signal={sig}", "--batch", str(job_id)])

    def wait_for_job(self, job_id: int, states=("COMPLETED",), timeout: float = 300,
                     on_timeout: Callable[[], str] = lambda: "") -> Dict[str, str]:
        """Poll until the job is in one of ``states`` or in a final state; returns its record."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states or state in final:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout} s: {info}\n"
                                     f"{on_timeout()}\n{self.daemon_logs(1500)}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node SLURM cluster (see the module docstring); ``SLURM_CONF`` exported for the session."""
    if sys.platform != "linux":
        pytest.fail("the SLURM tests need Linux", pytrace=False)
    ensure_slurm_installed()
    note = ensure_node_names_resolve(NODES)
    if note:
        print(note, file=sys.stderr)
    # A short path: slurmd's spool and socket names must stay below the unix socket path limit.
    root = str(tmp_path_factory.mktemp("slurm"))
    cluster = SlurmCluster(root)
    old_conf = os.environ.get("SLURM_CONF")
    cluster.start()
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        yield cluster
    finally:
        cluster.stop()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        survivors = [n for n, p in cluster.procs.items() if p.poll() is None] + cluster.leftover_step_daemons()
        assert not survivors, f"SLURM processes survived the teardown: {survivors}"
