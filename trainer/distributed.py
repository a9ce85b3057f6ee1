"""Data-parallel training across processes (torchrun): one process per GPU, or per CPU with gloo.

Gradients are averaged with an all-reduce after each backward. Not DDP's module wrapper: a 2DASL
step runs the regressor twice on different inputs and trains the critic on a separate loss, which
DDP's one-forward-one-backward hooks do not fit; an explicit all-reduce is exact and simple.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.device import pick_device


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> World:
        """torchrun's WORLD_SIZE / RANK / LOCAL_RANK; a single process without them."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            use_nccl = torch.cuda.is_available() and device != "cpu"
            dist.init_process_group(backend="nccl" if use_nccl else "gloo")
            owns = True
        return cls(rank=dist.get_rank(), size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")), owns_group=owns)

    def device(self, preference: str) -> torch.device:
        if self.enabled and torch.cuda.is_available() and preference != "cpu":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return pick_device(preference)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank ends with the mean gradient; a parameter no loss reached counts as zero."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, *modules: torch.nn.Module) -> None:
        """Rank 0's weights everywhere (randomly initialised parts would otherwise differ)."""
        if self.enabled:
            for module in modules:
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def gather(self, value) -> list:
        if not self.enabled:
            return [value]
        out = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def check_in_sync(self, *modules: torch.nn.Module) -> None:
        """The invariant of data parallelism: every rank holds the same weights."""
        if not self.enabled:
            return
        digest = float(sum(t.double().sum() for m in modules for t in m.state_dict().values()
                           if t.is_floating_point()))
        digests = self.gather(digest)
        if max(digests) - min(digests) > 1e-6 * max(1.0, abs(digests[0])):
            raise RuntimeError(f"data-parallel ranks diverged: parameter sums {digests}")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """Every rank reaches the end before any tears its connections down, then the group is destroyed.
        Without the barrier a rank may destroy the group while a peer still uses it; a two-process run
        once aborted at its end with gloo's "terminate called without an active exception", which is
        the failure this guards against (not reproduced on demand)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
