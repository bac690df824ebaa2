"""The search's data parallelism: torch.distributed under ``torchrun``, or a single process behind the same calls.

The search loop calls :meth:`Dist.all_sum` and :meth:`Dist.barrier` whatever the launch, so that one
process and N processes run the same code (decision: gloo on the CPU, nccl on CUDA).
"""
from __future__ import annotations

import os

import torch

__all__ = ["Dist"]


class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        self.enabled = False
        self.comm_device = torch.device("cpu")

    def setup(self, device: torch.device):
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend)
            self.owned = True
        self.enabled = True
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def teardown(self):
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False
