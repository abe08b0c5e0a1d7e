"""planc with FSDP2-sharded parameters (`torch.distributed.fsdp.fully_shard`, DTensors).

After `fully_shard(pruned.module)` every parameter is a DTensor sharded on dim 0 (rows
of a Linear weight, output channels of a Conv2d; the stored (in, out) dim of a
transposed Conv1D weight): each rank holds a contiguous slice of rows, and FSDP2 gathers
the whole weight only around forward and backward. The runtime reads and writes masked
weights outside forward, so it goes through this module:

- reading for a decision (block scores, reports, state): `full(t)` all-gathers the whole
  tensor, one layer at a time. Collective: every rank calls it in the same order (the
  runtime's schedule is a function of the step only, so it does).
- writing zeros into pruned blocks (after every optimizer step, and into the optimizer
  state at a pruning): `fill_(t, hit)` applies the full-shaped bool `hit` to this rank's
  slice only. No communication: the slice of `hit` comes from the tensor's own placement
  (a Replicate→Shard redistribute is a local chunk).
- restoring a full value (a checkpoint): `copy_(param, value)`, again into this rank's
  slice only; `shard_like(value, ref)` gives the DTensor a sharded optimizer state holds.
- the attention logits are parameters of the masks and are sharded too; `full_logits`
  swaps the full grid in for reading (as FSDP2 itself swaps unsharded parameters in for
  forward) and swaps the shard back.
- `check_groups(module)`: a compiled GraphModule reads every weight at the top of its
  forward (`get_attr`), so an FSDP group on a submodule the graph never calls would never
  gather its parameters. One planc error instead of torch's "mixed torch.Tensor and
  DTensor" deep inside a mask.

Without DTensors (one process, DDP) every helper is the identity or a plain in-place op.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import fx, nn

from planc.errors import RuntimeStateError

# torch.distributed.fsdp and .tensor cost 0.6 s to import, and every planc process
# imports the runtime; nothing can be a DTensor or an FSDP group before the user's code
# imported them, so look them up where they are already loaded instead of importing.
_DTENSOR_MODULE = "torch.distributed.tensor"
_FSDP_MODULE = "torch.distributed.fsdp"


def is_sharded(t: Any) -> bool:
    mod = sys.modules.get(_DTENSOR_MODULE)
    return mod is not None and isinstance(t, mod.DTensor)


def uses_fsdp(module: nn.Module) -> bool:
    """Whether `module` or any submodule is an FSDP2 group."""
    mod = sys.modules.get(_FSDP_MODULE)
    return mod is not None and any(isinstance(m, mod.FSDPModule) for m in module.modules())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered from the shards when sharded; collective)."""
    return t.full_tensor() if is_sharded(t) else t


def _local_slice(value: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of the full-shaped `value`, laid out as `like`'s local tensor
    (`like` is a DTensor, so torch.distributed.tensor is loaded)."""
    from torch.distributed.tensor import DTensor, Replicate   # lazy: already loaded here; 0.6 s for every other import

    replicated = DTensor.from_local(value.to(like.device), like.device_mesh,
                                    [Replicate()] * like.device_mesh.ndim, run_check=False)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()


@torch.no_grad()
def fill_(t: torch.Tensor, hit: torch.Tensor, value: float = 0.0) -> None:
    """t[hit] = value in place, `hit` a bool of t's full shape; a sharded t is written on
    this rank's slice only (no communication)."""
    if is_sharded(t):
        t.to_local().masked_fill_(_local_slice(hit, t), value)
    else:
        t.masked_fill_(hit.to(t.device), value)


@torch.no_grad()
def copy_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param ← value (full shape); a sharded param takes this rank's slice."""
    if is_sharded(param):
        param.to_local().copy_(_local_slice(value.to(param.dtype), param))
    else:
        param.copy_(value)


def shard_like(value: Any, ref: Any) -> Any:
    """`value` (a full tensor) as a DTensor placed like `ref`; `value` itself when `ref`
    is not sharded or `value` is not a tensor of ref's shape (a step counter)."""
    if not (is_sharded(ref) and isinstance(value, torch.Tensor) and not is_sharded(value)
            and tuple(value.shape) == tuple(ref.shape)):
        return value
    from torch.distributed.tensor import DTensor   # loaded: ref is one

    local = _local_slice(value.to(ref.dtype), ref).clone()
    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def gather_state(obj: Any, keep: bool = True) -> Any:
    """`obj` (nested dicts, lists, tuples) with every DTensor replaced by its full tensor
    on the CPU. Collective, in the structure's order. keep=False (ranks that write
    nothing) drops the gathered tensors at once and returns None for them."""
    if is_sharded(obj):
        whole = obj.full_tensor()
        return whole.detach().cpu().clone() if keep else None
    if isinstance(obj, dict):
        return {k: gather_state(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_state(v, keep) for v in obj)
    return obj


@contextlib.contextmanager
def full_logits(masks: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, each mask's sharded `logits` reads as the full grid (gathered on
    entry, one mask at a time); the shards are back in place on exit. Read-only: a write
    to the full grid is lost (write with copy_)."""
    swapped = []
    try:
        for mask in masks:
            logits = getattr(mask, "logits", None)
            if is_sharded(logits):
                mask._parameters["logits"] = nn.Parameter(logits.full_tensor().detach(), requires_grad=False)
                swapped.append((mask, logits))
        yield
    finally:
        for mask, logits in swapped:
            mask._parameters["logits"] = logits


# ---- checks ------------------------------------------------------------------------
def _called_by_graph(root: nn.Module, name: str) -> bool:
    """Whether submodule `name`'s forward runs when `root` runs: its nearest GraphModule
    ancestor's graph calls it (or an ancestor of it below that GraphModule); eager
    parents are assumed to call their children."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = root.get_submodule(".".join(parts[:cut]))
        if isinstance(owner, fx.GraphModule):
            rest = ".".join(parts[cut:])
            called = {str(n.target) for n in owner.graph.nodes if n.op == "call_module"}
            return any(rest == c or rest.startswith(c + ".") for c in called)
    return True


def check_groups(module: nn.Module) -> None:
    """RuntimeStateError naming the first FSDP2 group the compiled graph never calls."""
    if not uses_fsdp(module):
        return
    from torch.distributed.fsdp import FSDPModule   # loaded: uses_fsdp found a group

    for name, sub in module.named_modules():
        if name and isinstance(sub, FSDPModule) and not _called_by_graph(module, name):
            raise RuntimeStateError(
                f"fully_shard({name!r}): the compiled module reads this layer's weights with get_attr at the top "
                "of its forward and never calls the layer, so its FSDP group would never gather them; "
                "shard the compiled module itself: fully_shard(pruned.module)")


def check_optimizer(module: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """RuntimeStateError if the optimizer holds parameters that fully_shard replaced (it
    was built before sharding, so it would update tensors the model no longer uses)."""
    if optimizer is None or not uses_fsdp(module):
        return
    current = {id(p) for p in module.parameters()}
    stale = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in current)
    if stale:
        raise RuntimeStateError(
            f"the optimizer holds {stale} parameters that are not the sharded model's: build it after "
            "fully_shard(pruned.module) (e.g. from pruned.param_groups(...)), then attach it")


# ---- whole-model state for checkpoints and the run folder ---------------------------
def shard_module(module: nn.Module) -> nn.Module:
    """FSDP2 over the compiled module's root (the layout `planc apply` trains with
    `train.distributed: fsdp`): every parameter sharded on dim 0 over the default
    process group; FSDP2 gathers them for each forward and backward."""
    from torch.distributed.fsdp import fully_shard   # lazy: see _FSDP_MODULE

    return fully_shard(module)


def load_model_state(module: nn.Module, state: dict) -> None:
    """module.load_state_dict(state) for full tensors into a sharded module: each rank
    takes its slices (exact copies, so a resumed run continues bitwise)."""
    current = module.state_dict()
    module.load_state_dict({k: shard_like(v, current.get(k)) for k, v in state.items()})


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict(state) from full tensors (gather_state of a sharded
    optimizer's state_dict, the same layout as one process's), then each per-parameter
    tensor sharded like its parameter."""
    optimizer.load_state_dict(state)
    for param, entries in optimizer.state.items():
        for key, value in list(entries.items()):
            entries[key] = shard_like(value, param)
