"""Save a real 2-D (FSDP2 x tensor parallel) distributed checkpoint with its ground truth.

Run under torchrun with 4 ranks (a dp 2 x tp 2 CPU mesh, gloo)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 4 tests/interop/dcp_2d.py OUT

A small MLP: ``up`` = Linear(8, 10) column-parallel (``Shard(0)`` over tp), ``down`` =
Linear(10, 8) row-parallel (``Shard(1)``), a LayerNorm replicated over tp; then
``fully_shard`` over dp, which cuts dim 0 of each tensor-parallel slice in ``torch.chunk``
pieces (``up``'s 5-row slices in 3 + 2 rows: torch's ``_StridedShard``). One AdamW step,
then ``dcp.save({"model", "optim"}, OUT/dcp)``; rank 0 writes ``OUT/truth.pt``: every
tensor in full (``full_tensor()``) as ``model/<fqn>``, ``exp_avg/<fqn>``,
``exp_avg_sq/<fqn>``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(1234)

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(8, 10, bias=False)
            self.down = nn.Linear(10, 8, bias=False)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.down(torch.relu(self.up(x))))

    model = Mlp()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(dist.get_rank() // 2)  # one batch per dp rank
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / "dcp"))
    truth = {f"model/{k}": v.full_tensor() for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for kind in ("exp_avg", "exp_avg_sq"):
            truth[f"{kind}/{fqn}"] = state[kind].full_tensor()
    if dist.get_rank() == 0:
        torch.save(truth, out / "truth.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
