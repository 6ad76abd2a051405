"""Runs a function on several processes joined by a Gloo process group on the CPU, for the
cross-rank tests: each rank's return value comes back to the test, and an exception in any rank
fails it with that rank's traceback. A run that does not finish in ``timeout`` seconds is killed.

    def check(rank, world_size, x):          # module level: the spawned processes import it
        ...                                  # torch.distributed is initialised (gloo)
        return {"metric": value}

    results = run_ranks(3, check, x)         # [rank 0's value, rank 1's, rank 2's]
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: The world sizes the issue asks for.
WORLD_SIZES = (2, 3)


def _worker(rank: int, world_size: int, tmp: str, fn, args) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
        dist.barrier()  # nobody tears the group down while another rank still uses it
    finally:
        dist.destroy_process_group()
    # The rank's work is done and saved: leave without the interpreter's teardown, where a Gloo
    # thread still joinable at static destruction aborts the process now and then under load
    # ("terminate called without an active exception"), failing a run whose results are all in.
    # An exception in fn never gets here: it reaches the test with its traceback.
    os._exit(0)


def run_ranks(world_size: int, fn, *args, timeout: float = 180.0) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; their return values in rank order."""
    with tempfile.TemporaryDirectory(prefix="trainscope-dist-") as tmp:
        ctx = mp.spawn(_worker, args=(world_size, tmp, fn, args), nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"run_ranks: {fn.__name__} on {world_size} ranks did not finish in {timeout} s")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def fully_shard_linears(model, world_size: int):
    """``model`` under FSDP2 on a CPU mesh of the group: each nn.Linear its own unit, then the
    model; every parameter becomes a DTensor sharded on dim 0."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
