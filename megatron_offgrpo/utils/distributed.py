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
from typing import Any, Callable, List

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


def find_free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # One intra-op thread per rank: ranks share the cores, oversubscription only slows everyone down.
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        # Ship the result as bytes: tensors sent as-is travel through shared memory that vanishes when this
        # process exits, before the parent has read them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure (assertions included) to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the results by rank.

    ``fn`` must be importable (module level) and its arguments/results picklable. A failure on any rank raises
    ``RuntimeError`` carrying that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, queue), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict = {}
    errors: List[str] = []
    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            errors.append(f"timed out after {timeout_s} s waiting for ranks")
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                errors.append("a rank exited without reporting (crashed or was killed)")
                break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
            break  # the other ranks are likely blocked in a collective; don't wait for them
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
