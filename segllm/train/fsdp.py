"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Each process keeps a shard of every parameter, gradient and optimizer state (each LLM layer is
its own unit; the rest of the model forms the root unit), so memory per process falls with the
number of processes. Works on CPU (gloo) and GPU (NCCL). Checkpoints hold the full, unsharded
model and optimizer state in the same files as a one-process or DDP run, so a run resumes on any
number of processes and in either mode.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def shard(model: nn.Module, device_type: str) -> nn.Module:
    """Shard ``model`` (a SegLLM) in place across all processes of the default process group."""
    # torch.distributed.fsdp.fully_shard is public from torch 2.6 (segllm needs >= 2.4): imported
    # only when sharding is asked for
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in model.llm.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the optimizer's order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (gathered) model state dict, on CPU, on the first process (others get an empty
    dict). Collective: every process must call it."""
    # only a sharded run gets here (see shard for why this is not at the top)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state keyed by parameter index (the layout of an unsharded run), on the
    first process (others get an empty dict). Collective."""
    # only a sharded run gets here (see shard for why this is not at the top)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not sd:
        return {}
    index = {name: i for i, name in enumerate(trainable_names(model))}
    groups = []
    for g in sd["param_groups"]:
        groups.append({**g, "params": [index[n] for n in g["params"]]})
    return {"state": {index[n]: st for n, st in sd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load an index-keyed full optimizer state (see :func:`full_optimizer_state`) into the shards."""
    # only a sharded run gets here (see shard for why this is not at the top)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = trainable_names(model)
    known = [set(g) for g in optimizer.param_groups]
    # group entries a fresh optimizer lacks (the LR scheduler's initial_lr) are put back afterwards
    extra = [{k: v for k, v in g.items() if k not in own and k != "params"} for g, own in zip(sd["param_groups"], known)]
    full = {
        "state": {names[int(i)]: st for i, st in sd["state"].items()},
        "param_groups": [
            {**{k: v for k, v in g.items() if k in own}, "params": [names[int(i)] for i in g["params"]]}
            for g, own in zip(sd["param_groups"], known)
        ],
    }
    # not strict: parameters that never got a gradient (e.g. a vision layer past the one read)
    # have no optimizer state, as in an unsharded run
    set_optimizer_state_dict(model, optimizer, optim_state_dict=full, options=StateDictOptions(full_state_dict=True, strict=False))
    for group, more in zip(optimizer.param_groups, extra):
        group.update(more)


@contextmanager
def unsharded(model: nn.Module):
    """Gather the root unit's parameters for code that does not go through ``model.forward``
    (evaluation calls the parts directly); the LLM layers gather their own as they run."""
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()
