"""The built-in trainer of `planc apply`: model and data from the plan's factories,
compile, train with the plan's optimizer and lr schedule while the runtime runs the
phase schedule, evaluate, checkpoint, and write the run folder.

Resume is bitwise: a checkpoint (one safetensors file, JSON in its metadata, written
atomically) holds the model, the optimizer, the runtime, every RNG state and the data
loader's position (the RNG states at the start of the current epoch and the number of
batches drawn since), so a resumed run replays the epoch's shuffle and continues exactly
where the interrupted one stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from planc.checkpoint import checkpoint_paths, load_state_or_previous, remove_checkpoints, save_state_keep_previous
from planc.errors import FactoryError, PlancError, PlanError, Problem, RunFolderError
from planc.plan.types import Factory, Plan, Schedule
from planc.runtime import Runtime

CHECKPOINT = "checkpoint.safetensors"
CKPT_FORMAT = "planc.checkpoint/1"


# ---- building things from the plan --------------------------------------------------
def call_factory(plan: Plan, where: str = "model.factory", factory: Optional[Factory] = None):
    """Import the plan's `module:callable` at `where` ("model.factory" or "train.data";
    the callable may be dotted) and call it with its kwargs. `factory` replaces the
    plan's own. A name that does not import is a PlanError at the key's line (the plan
    is wrong); code that raises is a FactoryError (the user's code failed)."""
    if factory is None:
        factory = plan.model.factory if where == "model.factory" else plan.train.data
    if factory is None:
        raise PlanError([plan.problem(where, f"expected {where} in the plan, to build the model and data from")])
    module_name, sep, attr = factory.path.partition(":")
    if not sep or not module_name or not attr:
        raise PlanError([plan.problem(where, f"expected 'module:callable', got {factory.path!r}")])
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise PlanError([plan.problem(where, f"cannot import {factory.path!r}: {err}")]) from None
    except Exception as err:          # the module itself raised while importing
        raise FactoryError(f"{plan.problem(where, f'importing {factory.path!r} raised {_describe(err)}')}") from err
    if not callable(obj):
        raise PlanError([plan.problem(where, f"{factory.path!r} is not callable")])
    try:
        return obj(**factory.kwargs_dict())
    except Exception as err:
        raise FactoryError(f"{plan.problem(where, f'{factory.path!r} raised {_describe(err)}')}") from err


def _describe(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def make_optimizer(plan: Plan, runtime: Runtime) -> torch.optim.Optimizer:
    o = plan.train.optimizer
    if o.name == "sgd":
        groups = runtime.param_groups(lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
        return torch.optim.SGD(groups, lr=o.lr)
    if o.name in ("adam", "adamw"):
        groups = runtime.param_groups(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=o.lr)
    raise PlanError([plan.problem("train.optimizer.name", f"expected optimizer sgd, adam or adamw, got {o.name!r}")])


def lr_factor(step: int, total: int, kind: str, warmup: int) -> float:
    """Multiplier of the base lr at `step`: linear warm-up over `warmup` steps, then
    constant, cosine to zero or linear to zero over the remaining steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, max(0.0, (step - warmup) / span))
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "linear":
        return 1.0 - p
    raise PlanError([Problem(f"expected lr_schedule constant, cosine or linear, got {kind!r}", path="train.lr_schedule")])


def scale_schedule(plan: Plan, steps: int) -> Plan:
    """The plan with train.steps = `steps`: a preset is expanded again over the new
    length (planc.plan.presets); explicit phases are scaled proportionally (boundaries
    rounded, sparsify intervals kept). Used by `planc apply --steps`."""
    if steps <= 0:
        raise PlanError([plan.problem("train.steps", f"expected a positive number of steps, got {steps}")])
    m = plan.method
    if plan.schedule.preset is not None:
        from planc.plan import presets

        try:
            phases = presets.expand(m.name, plan.schedule.preset, steps, c=m.c, every=m.update_every)
        except ValueError as err:
            need = presets.min_steps(m.name, plan.schedule.preset)
            raise PlanError([plan.problem("train.steps",
                                          f"{err}; preset {plan.schedule.preset!r} needs at least {need} steps")]) from None
    else:
        old = plan.schedule.total_steps or plan.train.steps
        bounds = [p.start for p in plan.schedule.phases] + [old]
        new = [int(round(b * steps / old)) if old else 0 for b in bounds]
        phases = tuple(dataclasses.replace(p, start=new[i], steps=new[i + 1] - new[i])
                       for i, p in enumerate(plan.schedule.phases))
    return dataclasses.replace(plan, train=dataclasses.replace(plan.train, steps=steps),
                               schedule=Schedule(phases=phases, preset=plan.schedule.preset))


def plan_fingerprint(plan: Plan) -> str:
    bare = dataclasses.replace(plan, source=None, output=None)
    return hashlib.sha256(repr(bare).encode()).hexdigest()


# ---- the data position --------------------------------------------------------------
class Batches:
    """An endless iterator over a DataLoader's epochs that knows its position: the RNG
    states at the start of the current epoch and the number of batches drawn since."""

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.index = 0
        self._it = None
        self._epoch_rng: Optional[torch.Tensor] = None
        self._epoch_gen: Optional[torch.Tensor] = None

    @property
    def _gen(self) -> Optional[torch.Generator]:
        return getattr(self.loader, "generator", None)

    def _begin(self) -> None:
        self._epoch_rng = torch.get_rng_state()
        self._epoch_gen = self._gen.get_state() if self._gen is not None else None
        self._it = iter(self.loader)
        self.index = 0

    def __next__(self):
        if self._it is None:
            self._begin()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._begin()
            try:
                batch = next(self._it)
            except StopIteration:
                raise RunFolderError("the training data loader is empty") from None
        self.index += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "begun": self._it is not None,
                "epoch_rng": self._epoch_rng, "epoch_gen": self._epoch_gen,
                "gen": self._gen.get_state() if self._gen is not None else None}

    def restore(self, state: dict) -> None:
        """Replay the current epoch up to the saved position. Leaves the global RNG
        changed: restore it afterwards."""
        self.epoch = int(state["epoch"])
        self._it = None
        self.index = 0
        if not state["begun"]:
            return
        torch.set_rng_state(state["epoch_rng"])
        if self._gen is not None and state["epoch_gen"] is not None:
            self._gen.set_state(state["epoch_gen"])
        self._it = iter(self.loader)
        self._epoch_rng, self._epoch_gen = state["epoch_rng"], state["epoch_gen"]
        for _ in range(int(state["index"])):
            next(self._it)
        self.index = int(state["index"])
        if self._gen is not None and state["gen"] is not None:
            self._gen.set_state(state["gen"])


# ---- evaluation -----------------------------------------------------------------------
def _split_batch(batch):
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise RunFolderError(f"expected batches of (inputs, targets), got {type(batch).__name__}")


def compute_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    if kind == "mse":
        return F.mse_loss(out, y.to(out.dtype).view_as(out))
    raise PlanError([Problem(f"expected loss cross_entropy or mse, got {kind!r}", path="train.loss")])


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader, loss: str) -> Dict[str, float]:
    """Mean loss over the loader and, for classification, accuracy (in %)."""
    was_training = module.training
    module.eval()
    total, n, correct = 0.0, 0, 0
    try:
        for batch in loader:
            x, y = _split_batch(batch)
            out = module(x)
            total += float(compute_loss(loss, out, y)) * len(y)
            n += len(y)
            if loss == "cross_entropy":
                correct += int((out.argmax(dim=-1) == y).sum())
    finally:
        module.train(was_training)
    metrics = {"loss": total / max(n, 1)}
    if loss == "cross_entropy":
        metrics["accuracy"] = 100.0 * correct / max(n, 1)
    return metrics


# ---- the trainer ----------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Optional[str]
    pruned: Any
    baked: Any
    report: dict
    history: List[dict] = field(default_factory=list)
    finished: bool = True
    main: bool = True             # rank 0 (or the only process): the one that wrote files


def _progress(total: int, initial: int, enabled: Optional[bool]):
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:   # the bar is a nicety; training does not need it
        return None
    return tqdm(total=total, initial=initial, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, desc="planc")


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))


def _rng_state() -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], torch.from_numpy(np.asarray(npst[1]).astype(np.int64)), int(npst[2]),
                      int(npst[3]), float(npst[4])]}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def train(plan: Plan, out: Optional[str] = None, *, resume: bool = False, stop_after: Optional[int] = None,
          progress: Optional[bool] = None, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
          ) -> TrainResult:
    """Run the plan end to end. `out`: the run folder (None: no files written). `resume`:
    continue from `out`/checkpoint.safetensors if there is one. `stop_after`: stop after
    that many steps without finishing (what an interruption looks like; for tests).

    Under torchrun (planc.distributed.join_from_environment) every rank runs this with
    the same plan: each trains DDP on its slice of every global batch, so the run is the
    single-process run up to float summation order; rank 0 alone writes and logs."""
    from planc import distributed

    ranks = distributed.join_from_environment()
    try:
        return _train(plan, out, ranks, resume=resume, stop_after=stop_after, progress=progress,
                      log=log if ranks.main else (lambda s: None))
    finally:
        ranks.finish()


def _train(plan: Plan, out: Optional[str], ranks, *, resume: bool, stop_after: Optional[int],
           progress: Optional[bool], log: Callable[[str], None]) -> TrainResult:
    from planc import compile as planc_compile
    from planc import runfolder

    t_start = time.perf_counter()
    if plan.model.factory is None:
        raise PlanError([plan.problem("model.factory", "the built-in trainer needs model.factory")])
    if plan.train.data is None:
        raise PlanError([plan.problem("train.data", "the built-in trainer needs train.data")])
    total = plan.train.steps
    if out is not None:
        os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, CHECKPOINT) if out is not None else None
    writes = out is not None and ranks.main
    events_path = os.path.join(out, runfolder.EVENTS) if writes else None

    _seed_all(plan.train.seed)
    model = call_factory(plan, "model.factory")
    loaders = call_factory(plan, "train.data")
    if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
        raise PlanError([plan.problem("train.data", "expected the data factory to return (train_loader, eval_loader)")])
    train_loader, eval_loader = loaders
    pruned = planc_compile(model, plan)          # example inputs: the plan's shapes
    if events_path and not (resume and checkpoint_paths(ckpt_path)):
        open(events_path, "w").close()           # a fresh run starts a fresh log
    runtime = Runtime(pruned, events_path=events_path)
    pruned.runtime = runtime                     # Pruned's delegations use this runtime
    opt = make_optimizer(plan, runtime)
    base_lrs = [g["lr"] for g in opt.param_groups]
    runtime.attach(opt)
    batches = Batches(train_loader)
    history: List[dict] = []
    timings = {"train_s": 0.0, "eval_s": 0.0}

    if resume and ckpt_path and checkpoint_paths(ckpt_path):
        # a truncated or corrupt latest checkpoint is named and the previous one is used
        state, used = load_state_or_previous(ckpt_path, log=log)
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
            raise RunFolderError(f"{used}: not a planc checkpoint")
        if state.get("plan") != plan_fingerprint(plan):
            raise RunFolderError(f"{used}: written by a different plan; remove it or run without --resume")
        pruned.module.load_state_dict(state["model"])
        runtime.load_state_dict(state["runtime"])
        opt.load_state_dict(state["optimizer"])
        batches.restore(state["loader"])
        _set_rng_state(state["rng"])
        history = list(state["history"])
        timings = dict(state["timings"])
        log(f"planc: resumed {out} at step {runtime.t}")
    elif resume:
        log(f"planc: no checkpoint in {out}; starting from step 0")

    def checkpoint() -> None:
        if not writes:
            return
        save_state_keep_previous(ckpt_path, {
            "format": CKPT_FORMAT, "plan": plan_fingerprint(plan), "step": runtime.t,
            "model": pruned.module.state_dict(), "optimizer": opt.state_dict(),
            "runtime": runtime.state_dict(), "loader": batches.state(), "rng": _rng_state(),
            "history": history, "timings": timings,
        })

    bar = _progress(total, runtime.t, progress if ranks.main else False)
    module = pruned.module
    module.train()
    forward = module
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(module)   # all-reduces gradients; decisions: planc.distributed
    last_loss, metric = float("nan"), None
    try:
        while runtime.t < total:
            t0 = time.perf_counter()
            step = runtime.t
            factor = lr_factor(step, total, plan.train.lr_schedule, plan.train.warmup_steps)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            x, y, share = ranks.share(*_split_batch(next(batches)))
            loss = compute_loss(plan.train.loss, forward(x), y)
            global_loss = float(ranks.mean(loss.detach() * share))   # every rank sees the same value
            if not math.isfinite(global_loss):
                raise PlancError(f"the loss became {global_loss} at step {step}; lower the learning rate")
            (loss * share).backward()                                # share is exactly 1.0 on one process
            opt.step()
            opt.zero_grad(set_to_none=True)
            runtime.step()
            last_loss = global_loss
            timings["train_s"] += time.perf_counter() - t0
            t = runtime.t
            if plan.train.eval_every and t % plan.train.eval_every == 0 and t < total:
                t1 = time.perf_counter()
                m = evaluate(module, eval_loader, plan.train.loss)
                timings["eval_s"] += time.perf_counter() - t1
                entry = {"step": t, "train_loss": last_loss, **m}
                history.append(entry)
                runtime.record({"event": "eval", **entry})
                metric = m.get("accuracy", m["loss"])
            if bar is not None:
                bar.update(1)
                phase = runtime.phase
                post = {"phase": phase.kind if phase else "-", "sparsity": f"{runtime.mean_sparsity():.3f}",
                        "loss": f"{last_loss:.4f}"}
                if metric is not None:
                    post["metric"] = f"{metric:.2f}"
                bar.set_postfix(post, refresh=False)
            if ckpt_path and plan.train.checkpoint_every and t % plan.train.checkpoint_every == 0 and t < total:
                checkpoint()
            if stop_after is not None and t >= stop_after and t < total:
                return TrainResult(out, pruned, None, {}, history, finished=False, main=ranks.main)
    finally:
        if bar is not None:
            bar.close()

    t1 = time.perf_counter()
    final = evaluate(module, eval_loader, plan.train.loss)
    timings["eval_s"] += time.perf_counter() - t1
    entry = {"step": runtime.t, "train_loss": last_loss, **final}
    history.append(entry)
    runtime.record({"event": "eval", **entry})
    t2 = time.perf_counter()
    baked = pruned.bake().eval()                 # the product is for inference
    timings["bake_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t_start
    timings["steps_per_s"] = total / timings["train_s"] if timings["train_s"] else None
    report = runfolder.make_report(plan, runtime, final, history, timings)
    if ranks.world > 1:
        report["ranks"] = ranks.world
    if plan.lower.backend != "dense" and ranks.main:
        from planc.lowering import lower_and_measure
        from planc.pruned import example_inputs_for

        report["lowering"] = lower_and_measure(baked, plan, example_inputs_for(plan.model))
    if writes:
        runfolder.write(out, plan, pruned, baked, report, runtime.events)
        if ckpt_path:
            remove_checkpoints(ckpt_path)        # the run folder is the product now
    return TrainResult(out, pruned, baked, report, history, finished=True, main=ranks.main)
