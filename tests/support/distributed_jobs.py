"""Training jobs for ``tests/runtime/test_distributed.py``: the same float64 runs in one process
and on the ranks of a gloo group (DDP, FSDP2, ZeRO), with the tracker's records, the final
parameters, and what the tracker communicated.

Every rank takes its half of each global batch; the single-process reference averages the loss
of the same halves (each through the model on its own, as BatchNorm sees them under DDP), so
both take the same steps in exact arithmetic.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import symmech
from symmech.runtime.distributed import DistributedTracker, count_communication

WORLD = 2
STEPS = 6
BATCH = 6  # per rank
SGD = {
    "ddp": dict(lr=0.05, momentum=0.9),
    "fsdp": dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=1e-2),
    "zero": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlp() -> nn.Module:
    """Hidden width 5: FSDP2 splits its rows 3 / 2 over two ranks."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()


def convnet() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).double()


def batches(net: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    shape = (6,) if net == "mlp" else (1, 4, 4)
    n = WORLD * BATCH
    return [
        (
            torch.randn(n, *shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def mlp_bindings(m: nn.Module) -> list[symmech.Binding]:
    """Layouts where groups and shards disagree (FSDP2 shards every weight's rows)."""
    w0, b0, w2, w4 = m[0].weight, m[0].bias, m[2].weight, m[4].weight
    E = torch.tensor(
        [[1.0 if i == j else 0.3 / (1 + abs(i - j)) for j in range(5)] for i in range(5)],
        dtype=torch.float64,
    )
    return [
        symmech.bind("translation", layer="columns", theta=[(w4, 1)]),  # across ranks
        symmech.bind("translation", layer="columns_T", theta=[(w4, 0, "T")]),
        symmech.bind("rescale", layer="hidden", theta_1=[(w0, 0), (b0, 0)], theta_2=[(w2, 1)]),
        symmech.bind("scale", layer="cut_rows", theta=[(w0, 0, (6, 5))]),  # rows cut by shards
        symmech.bind(
            "linear_pair", layer="pair", constants={"E": E}, U=[(w2, None)], V=[(w4, None)]
        ),
    ]


def crossing_binding(m: nn.Module) -> symmech.Binding:
    """E mixes the columns of w0ᵀ, which are w0's rows: split across ranks under FSDP2."""
    E = torch.eye(5, dtype=torch.float64) + 0.1
    return symmech.bind(
        "linear_pair",
        layer="crossing",
        constants={"E": E},
        U=[(m[2].weight, None)],
        V=[(m[0].weight, None, "T")],
    )


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int | None,
    forward: nn.Module | None = None,
) -> None:
    """STEPS steps; ``rank=None``: the whole batch in one process (mean of the halves)."""
    forward = forward or model
    for x, y in data:
        opt.zero_grad()
        if rank is None:
            halves = zip(x.chunk(WORLD), y.chunk(WORLD))
            loss = sum(F.cross_entropy(forward(a), b) for a, b in halves) / WORLD
        else:
            lo, hi = rank * BATCH, (rank + 1) * BATCH
            loss = F.cross_entropy(forward(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()


def reference(net: str, kind: str) -> list[dict[str, Any]]:
    """The records of the same run in one process."""
    model = mlp() if net == "mlp" else convnet()
    data = batches(net)
    opt = torch.optim.SGD(model.parameters(), **SGD[kind])
    if net == "mlp":
        tracker = symmech.track(model, opt, mlp_bindings(model))
    else:
        tracker = symmech.track(model, opt, example_input=_confirm_batch(data))
    train(model, opt, data, None)
    return tracker.records()


def _confirm_batch(data):
    return data[0][0][:BATCH], data[0][1][:BATCH]


# -- the ranks -----------------------------------------------------------------------------
def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _wrap(kind: str, net: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Any]:
    """(model to bind, model to call, optimizer, detected families or None)."""
    model = mlp() if net == "mlp" else convnet()
    families = None
    if net == "conv":
        families = symmech.detect(
            model, _confirm_batch(batches(net))[0], confirm_batch=_confirm_batch(batches(net))
        )
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer)
        fully_shard(model)
        return model, model, torch.optim.SGD(model.parameters(), **SGD[kind]), families
    ddp = nn.parallel.DistributedDataParallel(model)
    if kind == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=torch.optim.SGD, **SGD[kind]
        )
    else:
        opt = torch.optim.SGD(ddp.parameters(), **SGD[kind])
    return ddp, ddp, opt, families


def _run(kind: str, net: str, rank: int, tracked: bool) -> dict[str, Any]:
    model, forward, opt, families = _wrap(kind, net)
    data = batches(net)
    tracker = None
    if tracked:
        if net == "mlp":
            inner = model.module if hasattr(model, "module") else model
            tracker = symmech.track(model, opt, mlp_bindings(inner))
        elif kind == "ddp":
            tracker = symmech.track(model, opt, example_input=_confirm_batch(data))
        else:
            tracker = symmech.track(model, opt, families)
    with count_communication() as comm:
        train(model, opt, data, rank, forward)
    out: dict[str, Any] = {
        "params": [_local(p).detach().clone() for p in model.parameters()],
        "step_bytes": comm.bytes,
    }
    if tracker is not None:
        assert isinstance(tracker, DistributedTracker)
        with count_communication() as comm:
            out["records"] = tracker.records()
        out["records_bytes"] = comm.bytes
        out["mode"] = tracker.mode
        # whether the steady banks were read at once (symmech.runtime.program)
        out["read_at_once"] = tracker._programs is not None and bool(tracker._programs._gathers)
    return out


def _refusal(rank: int) -> str:
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        symmech.track(model, opt, [crossing_binding(model)])
    except symmech.errors.BindingError as err:
        return str(err)
    return ""


def worker(rank: int, kind: str, nets: tuple[str, ...], port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result: dict[str, Any] = {}
        for net in nets:
            result[net] = {
                "tracked": _run(kind, net, rank, True),
                "plain": _run(kind, net, rank, False),
            }
        if kind == "fsdp":
            result["refusal"] = _refusal(rank)
        torch.save(result, Path(out) / f"{kind}_{rank}.pt")
        # no rank tears gloo down while the other still has collectives in flight (ZeRO's
        # broadcasts): that aborted a process once ("terminate called without an active
        # exception") under load
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(kind: str, nets: tuple[str, ...], out: Path) -> list[dict[str, Any]]:
    """Run ``worker`` on WORLD ranks; the results of every rank."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(kind, nets, free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"{kind}_{r}.pt", weights_only=False) for r in range(WORLD)]
