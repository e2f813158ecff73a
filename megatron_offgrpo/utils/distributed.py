"""Small distributed helpers: run a function on N real gloo processes and collect what each returns.

Used by the multi-rank tests and benchmarks on CPU. Each worker is a fresh ``spawn``-ed process (as torchrun
would start), with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` set; the worker function
initializes its own process group (normally through
:func:`megatron_offgrpo.utils.cpu_backend.initialize_cpu_model_parallel`).
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.multiprocessing as mp


def all_reduce_cpu(tensor: torch.Tensor, op=None, group=None) -> torch.Tensor:
    """All-reduce a small host-side tensor (metrics, counts) in place, whatever the backend.

    NCCL only reduces CUDA tensors, so on GPU the values take a round trip through the device; gloo reduces
    them where they are. A no-op without an initialized process group.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return tensor
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend(group) == "nccl":
        on_device = tensor.cuda()
        dist.all_reduce(on_device, op=op, group=group)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def distributed_env_from_launcher() -> None:
    """Fill in the ``env://`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM.

    ``torchrun`` sets them; ``srun`` (one task per rank) does not, and without this every task would believe it is
    rank 0 of a world of one and train its own copy into the same checkpoint directory. Values already set win
    (an sbatch script may export MASTER_ADDR / MASTER_PORT itself). Outside SLURM (no ``SLURM_PROCID``), or in a
    SLURM step of one task, nothing changes. MASTER_ADDR is the first host of the job's node list (``scontrol show
    hostnames``); MASTER_PORT is derived from the job id, so every task of the job picks the same one.
    """
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise RuntimeError("SLURM_PROCID is set but no SLURM node list is: export MASTER_ADDR (the first host)")
        import subprocess

        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   check=True, timeout=60).stdout.split()
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f"cannot expand the SLURM node list {nodelist!r} with scontrol ({e}): export "
                               "MASTER_ADDR (the first host of the job) before srun") from None
        env["MASTER_ADDR"] = hosts[0]
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def bootstrap_env() -> None:
    """The one launcher bootstrap: make the ``env://`` variables describe this process, however it was started.

    torchrun set them already; under srun they are derived from SLURM (:func:`distributed_env_from_launcher`);
    a plain ``python`` run becomes rank 0 of a world of one on a free loopback port.
    """
    distributed_env_from_launcher()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(find_free_port())


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (so that all ranks take the same branch); collective."""
    import torch.distributed as dist

    t = all_reduce_cpu(torch.tensor([1.0 if flag else 0.0]), op=dist.ReduceOp.MAX)
    return bool(t.item())


def find_free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    ``fn`` must be importable (module level) and its arguments/results picklable. A failure on any rank raises
    ``RuntimeError`` carrying that rank's traceback. After :func:`use_rank_pools`, the processes of a
    :class:`RankPool` of that size run it (started once, reused); otherwise fresh ones are spawned.
    """
    if _POOLS is not None:
        pool = _POOLS.get(world_size)
        if pool is None or not pool.alive:
            pool = _POOLS[world_size] = RankPool(world_size)
        return pool.run(fn, *args, timeout_s=timeout_s)
    pool = RankPool(world_size)  # one task, then the processes exit
    try:
        return pool.run(fn, *args, timeout_s=timeout_s)
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------------ rank pools
_POOLS: Optional[Dict[int, "RankPool"]] = None


def use_rank_pools(enabled: bool = True) -> None:
    """Make :func:`run_on_ranks` reuse long-lived worlds (one :class:`RankPool` per world size) instead of
    spawning processes per call; ``False`` closes them. The test suite turns this on for the session: every
    spawned rank pays for importing torch and Megatron, seconds each on a small machine."""
    global _POOLS
    if enabled and _POOLS is None:
        import atexit

        _POOLS = {}
        atexit.register(use_rank_pools, False)
    elif not enabled and _POOLS is not None:
        for pool in _POOLS.values():
            pool.close()
        _POOLS = None


def _pool_worker(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    """A pooled rank: run tasks until ``None``, each in a clean environment and process group of its own."""
    import signal

    import torch.distributed as dist

    base_env = dict(os.environ, OMP_NUM_THREADS="1")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    while True:
        task = tasks.get()
        if task is None:
            return
        port, fn, args = task
        os.environ.clear()
        os.environ.update(base_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        try:
            result = fn(rank, world_size, *args)
            buffer = io.BytesIO()
            torch.save(result, buffer)
            results.put((rank, "ok", buffer.getvalue()))
        except BaseException:
            results.put((rank, "error", traceback.format_exc()))
        finally:
            # What one task set up must not leak into the next: process groups, signal handlers, environment.
            if dist.is_initialized():
                try:
                    from megatron.core import parallel_state

                    parallel_state.destroy_model_parallel()
                except Exception:
                    pass
                dist.destroy_process_group()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


class RankPool:
    """``world_size`` spawned rank processes kept alive to run one function after another (tests, benchmarks).

    Each :meth:`run` is a fresh world: a new ``MASTER_PORT``, the environment reset, the process groups and
    signal handlers of the previous task torn down. A failed or timed-out task kills the pool (the other ranks
    may be stuck in a collective); :func:`run_on_ranks` then starts a new one.
    """

    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._results = ctx.SimpleQueue()
        self._tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        # Not daemons: a rank may start processes of its own (DataLoader workers). use_rank_pools closes the
        # pools at exit, before multiprocessing would wait for them.
        self._procs = [ctx.Process(target=_pool_worker, args=(r, world_size, self._tasks[r], self._results))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self.alive = True

    def run(self, fn: Callable, *args: Any, timeout_s: float = 600) -> List[Any]:
        """``fn(rank, world_size, *args)`` on every rank; the results by rank (as :func:`run_on_ranks`)."""
        port = find_free_port()
        for q in self._tasks:
            q.put((port, fn, args))
        results: dict = {}
        errors: List[str] = []
        deadline = time.monotonic() + timeout_s
        while len(results) < self.world_size and not errors:
            if time.monotonic() > deadline:
                errors.append(f"timed out after {timeout_s} s waiting for ranks")
            elif not self._results.empty():
                rank, status, payload = self._results.get()
                if status == "ok":
                    results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
            elif not all(p.is_alive() for p in self._procs):
                errors.append("a rank exited without reporting (crashed or was killed)")
            else:
                time.sleep(0.02)
        if errors:
            self.close(kill=True)
            raise RuntimeError("\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        """Stop the ranks (at once with ``kill``; else after their current task)."""
        if not self.alive:
            return
        self.alive = False
        for q, p in zip(self._tasks, self._procs):
            if not kill and p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 30)
            if p.is_alive():
                p.kill()
                p.join()
