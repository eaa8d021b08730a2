"""What the training loop needs from torch.distributed beyond DistributedDataParallel.

DDP averages the gradients of the module it wraps (the student). Modules that belong to loss
terms (the feature-KD transfer MLP, projection and second heads, a CLUB estimator) live outside
it, so their gradients are averaged here, with the same semantics as DDP with unused
parameters: a parameter that has a gradient on some process gets the mean over all processes
(zero where a process had none); one that has no gradient anywhere keeps ``grad = None``.
Without a process group (or with one process) every function does nothing.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    world = world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, anywhere in zip(params, has.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every process ``src``'s parameters and buffers (term modules start identical)."""
    if world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)
