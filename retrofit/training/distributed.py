"""Several processes under ``torchrun``, and the data order that makes them equal to one.

``torchrun --nproc-per-node N`` starts N copies of the same program with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`setup_distributed` reads them, joins the process
group (NCCL on CUDA, gloo on CPU) and pins each process to its GPU. Without those variables every
function here is a no-op for one process, so the training loop has a single code path.

The data order (:func:`epoch_batches`) is what makes N processes with batch B the same run as one
process with batch N*B: each epoch is one permutation of the dataset, fixed by (seed, epoch), cut
into global batches of N*B samples; process r takes the r-th contiguous slice of every global
batch. torch's ``DistributedSampler`` deals samples out round-robin and pads the last batch, which
gives the same sets for full batches but different ones at the end; this plan also splits the
last, short global batch and says how large it is, so the loss can be normalised by the global
batch size and the averaged gradient equals the single-process gradient for every step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from retrofit.errors import UsageError
from retrofit.evaluation.evaluate import resolve_device

PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)
"""How long a process waits at a collective. Rank 0 validates alone while the others wait, and a
large validation set takes longer than NCCL's 10-minute default."""


def is_main_process() -> bool:
    """True for rank 0 under ``torchrun`` and for a plain single process: the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes ``torchrun`` started (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes.

    ``owns_group`` is True when :func:`setup_distributed` created the process group (and
    :func:`teardown_distributed` will destroy it); a group the caller made is left alone.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that evaluates, prints and writes files."""
        return self.rank == 0


def setup_distributed(device: str) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group if there is one, and pick this process's device.

    One process (no ``WORLD_SIZE`` > 1 and no group already made by the caller) gets
    ``DistContext()`` and ``resolve_device(device)``. Several processes on CUDA each take
    ``cuda:LOCAL_RANK``.
    """
    already = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if already else world_size()
    resolved = resolve_device(device)
    if world <= 1:
        return DistContext(), resolved
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = dist.get_rank() if already else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if resolved.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:  # else set_device fails with "invalid device ordinal"
            raise UsageError(f"{world} processes on CUDA need a GPU each, this machine has "
                             f"{gpus}: start at most {gpus}, or pass --device cpu")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not already:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return DistContext(rank, world, local_rank, owns_group=not already), resolved


def teardown_distributed(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup_distributed` made it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def any_rank(ctx: DistContext, flags: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``flags`` over all processes (in place): True if any rank says so."""
    if ctx.enabled:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def sum_ranks(ctx: DistContext, values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (float64, so counts stay exact)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every process (small Python objects: records, flags)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module_state(ctx: DistContext, module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every process's ``module``, in place."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


# --------------------------------------------------------------------------- data order


@dataclass(frozen=True)
class PlannedBatch:
    """One step's samples for this process.

    ``indices`` are loaded; the first ``real`` of them count (``real`` is 0 only when the last
    global batch has fewer samples than there are processes: this process then loads one sample
    with weight 0 so that every process still takes part in the step). ``global_size`` is the
    number of samples in the step across all processes, the loss's denominator.
    """

    indices: list[int]
    real: int
    global_size: int


def order_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's permutation: depends on (seed, epoch) only, so a resumed
    run rebuilds any epoch's order without replaying the ones before it."""
    return (seed * 1_000_003 + epoch) % (2**63)


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    global_batch = batch_size * world_size
    return n // global_batch if drop_last else (n + global_batch - 1) // global_batch


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    drop_last: bool = False,
) -> list[PlannedBatch]:
    """This process's batches for one epoch (see the module docstring).

    With ``world_size`` N and ``batch_size`` B, the union of the N processes' step-k batches is
    exactly step k's batch of one process with batch N*B, for every k, the last one included.
    ``drop_last``: every process gets exactly B samples per step (a model with a fixed batch);
    the last ``n % (N*B)`` samples of the epoch's shuffled order are left out.
    """
    if drop_last:
        n_used = steps_per_epoch(n, batch_size, world_size, drop_last) * batch_size * world_size
    else:
        n_used = n
    generator = torch.Generator().manual_seed(order_seed(seed, epoch))
    order = torch.randperm(n, generator=generator)
    global_batch = batch_size * world_size
    batches = []
    for start in range(0, n_used, global_batch):
        chunk = order[start : start + global_batch]
        mine = torch.tensor_split(chunk, world_size)[rank].tolist()
        if mine:
            batches.append(PlannedBatch(mine, len(mine), len(chunk)))
        else:
            batches.append(PlannedBatch([int(chunk[0])], 0, len(chunk)))
    return batches
