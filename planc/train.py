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
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from planc import distributed, runfolder, sharding
from planc.checkpoint import remove_checkpoints, save_state_keep_previous
from planc.errors import PlancError, PlanError, Problem, RunFolderError, RuntimeStateError
from planc.lowering import lower_for_run
from planc.plan.factory import call_factory, describe_value
from planc.plan.types import Plan, Schedule
from planc.pruned import compile as planc_compile
from planc.pruned import example_inputs_for
from planc.runtime import Runtime
from planc.safeio import create_empty

CHECKPOINT = runfolder.CHECKPOINT
CKPT_FORMAT = "planc.checkpoint/1"


# ---- building things from the plan --------------------------------------------------
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
    if not isinstance(out, torch.Tensor):
        raise PlancError(f"the model returned {describe_value(out)}; the built-in trainer needs a tensor of predictions "
                         "(wrap the model so its forward returns the logits, or train it in your own loop)")
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


def _checkpoint_state(module, opt, runtime: Runtime, keep: bool) -> Optional[dict]:
    """Model, optimizer and runtime state as full tensors. A sharded module's are
    gathered (collective: every rank calls this; ranks with keep=False drop them), so a
    checkpoint has one layout whatever the run's sharding: one pickle-free file with its
    sha256 (planc.checkpoint), resumable on any number of ranks."""
    if not sharding.uses_fsdp(module):
        return {"model": module.state_dict(), "optimizer": opt.state_dict(),
                "runtime": runtime.state_dict()} if keep else None
    state = {"model": sharding.gather_state(module.state_dict(), keep),
             "optimizer": sharding.gather_state(opt.state_dict(), keep),
             "runtime": runtime.state_dict()}
    return state if keep else None


def _unsharded_copy(plan: Plan, module, keep: bool):
    """A plain Pruned holding `module`'s full (gathered) state, for bake and the run
    folder; None where keep is False. The model is built again from the plan's factory
    (under a forked RNG: training is over, but nothing after it should see a changed
    stream), so no rank holds an unsharded copy during training."""
    state = sharding.gather_state(module.state_dict(), keep)   # collective
    if not keep:
        return None
    with torch.random.fork_rng():
        plain = planc_compile(call_factory(plan, "model.factory"), plan)
    plain.module.load_state_dict(state)
    return plain


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
    already_finished: bool = False  # resume found this plan's finished run: nothing was trained
    lowered: Any = None           # the lowered model apply kept (None: it stayed dense)


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


@dataclass
class _Session:
    """What a run writes to and resumes from (planc.runfolder.prepare_output decided)."""

    out: Optional[str]
    writes: bool                       # this process writes files (rank 0 with an output folder)
    output: Any                        # runfolder.Output, or None without an output folder

    @property
    def checkpoint_path(self) -> Optional[str]:
        return os.path.join(self.out, CHECKPOINT) if self.out is not None else None

    @property
    def events_path(self) -> Optional[str]:
        return os.path.join(self.out, runfolder.EVENTS) if self.writes else None


def train(plan: Plan, out: Optional[str] = None, *, resume: bool = False, overwrite: bool = False,
          stop_after: Optional[int] = None, progress: Optional[bool] = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> TrainResult:
    """Run the plan end to end. `out`: the run folder (None: no files written). `resume`:
    continue the unfinished run of this plan in `out` (a finished one is returned as it
    is). `overwrite`: replace the planc run in `out` whatever it holds; without it a folder
    holding anything else is refused (OutputFolderError, nothing touched; see
    runfolder.prepare_output). `stop_after`: stop after that many steps without finishing
    (what an interruption looks like; for tests).

    Under torchrun (planc.distributed.join_from_environment) every rank runs this with
    the same plan: each trains DDP on its slice of every global batch, so the run is the
    single-process run up to float summation order; rank 0 alone writes and logs. With
    `train.distributed: fsdp` the compiled module is sharded with FSDP2 instead
    (planc.sharding): checkpoints and the run folder are written by rank 0 from full
    tensors gathered from the shards."""
    ranks = distributed.join_from_environment()
    try:
        return _train(plan, out, ranks, resume=resume, overwrite=overwrite, stop_after=stop_after,
                      progress=progress, log=log if ranks.main else (lambda s: None))
    finally:
        ranks.finish()


def _open_output(plan: Plan, out: Optional[str], ranks, *, resume: bool, overwrite: bool,
                 log: Callable[[str], None]) -> _Session:
    """Every rank reads the folder and takes the same decision before rank 0 changes it."""
    if out is None:
        return _Session(None, False, None)
    output = runfolder.prepare_output(out, plan, resume=resume, overwrite=overwrite, log=log)
    ranks.barrier()
    if ranks.main and output.action == "fresh":
        if output.replace:
            runfolder.clear_run(out)           # report.json first: a failed run never loads
        os.makedirs(out, exist_ok=True)
        create_empty(os.path.join(out, runfolder.EVENTS))      # a fresh run starts a fresh log
    return _Session(out, ranks.main, output)


def _restore(state: dict, used: str, pruned, runtime: Runtime, opt, batches: "Batches") -> Tuple[List[dict], dict]:
    """Load a checkpoint's state into the run; (history, timings). A state that does not
    fit this run is a RunFolderError naming the file. The checkpoint holds full tensors
    (also of a sharded run: _checkpoint_state); a sharded run takes its slices."""
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise RunFolderError(f"{used}: not a planc checkpoint")
    try:
        sharding.load_model_state(pruned.module, state["model"])
        runtime.load_state_dict(state["runtime"])
        sharding.load_optimizer_state(opt, state["optimizer"])
        batches.restore(state["loader"])
        _set_rng_state(state["rng"])
        return list(state["history"]), dict(state["timings"])
    except RuntimeStateError as err:
        raise RunFolderError(f"{used}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise RunFolderError(f"{used}: its state does not fit this run ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:160]})") from None


def _train(plan: Plan, out: Optional[str], ranks, *, resume: bool, overwrite: bool, stop_after: Optional[int],
           progress: Optional[bool], log: Callable[[str], None]) -> TrainResult:
    t_start = time.perf_counter()
    if plan.model.factory is None:
        raise PlanError([plan.problem("model.factory", "the built-in trainer needs model.factory")])
    if plan.train.data is None:
        raise PlanError([plan.problem("train.data", "the built-in trainer needs train.data")])
    total = plan.train.steps
    session = _open_output(plan, out, ranks, resume=resume, overwrite=overwrite, log=log)
    if session.output is not None and session.output.action == "finished":
        log(f"planc: {out} already holds this plan's finished run; nothing to do")
        return TrainResult(out, None, None, session.output.report, finished=True, main=ranks.main,
                           already_finished=True)
    ckpt_path, writes = session.checkpoint_path, session.writes

    _seed_all(plan.train.seed)
    model = call_factory(plan, "model.factory")
    train_loader, eval_loader = call_factory(plan, "train.data")
    pruned = planc_compile(model, plan)          # example inputs: the plan's shapes
    fsdp = ranks.world > 1 and plan.train.distributed == "fsdp"
    if fsdp:
        sharding.shard_module(pruned.module)     # before the optimizer: it must hold the sharded parameters
    runtime = Runtime(pruned, events_path=session.events_path)
    pruned.runtime = runtime                     # Pruned's delegations use this runtime
    opt = make_optimizer(plan, runtime)
    base_lrs = [g["lr"] for g in opt.param_groups]
    runtime.attach(opt)
    batches = Batches(train_loader)
    history: List[dict] = []
    timings = {"train_s": 0.0, "eval_s": 0.0}

    if session.output is not None and session.output.action == "resume":
        history, timings = _restore(session.output.state, session.output.state_file, pruned, runtime, opt, batches)
        log(f"planc: resumed {out} at step {runtime.t}")

    def checkpoint() -> None:
        state = _checkpoint_state(pruned.module, opt, runtime, keep=writes)
        if not writes:
            return
        save_state_keep_previous(ckpt_path, {
            "format": CKPT_FORMAT, "plan": runfolder.plan_fingerprint(plan), "step": runtime.t, **state,
            "loader": batches.state(), "rng": _rng_state(), "history": history, "timings": timings,
        })

    bar = _progress(total, runtime.t, progress if ranks.main else False)
    module = pruned.module
    module.train()
    forward = module
    if ranks.world > 1 and not fsdp:
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
    written = pruned                             # what bake and the run folder read
    if fsdp:                                     # full tensors gathered once, kept on rank 0 only
        written = _unsharded_copy(plan, module, keep=ranks.main)
    baked = written.bake().eval() if written is not None else None   # the product is for inference
    timings["bake_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t_start
    timings["steps_per_s"] = total / timings["train_s"] if timings["train_s"] else None
    report = runfolder.make_report(plan, runtime, final, history, timings)   # collective when sharded
    if ranks.world > 1:
        report["ranks"] = ranks.world
        report["distributed"] = plan.train.distributed
    lowered = None
    if plan.lower.backend != "dense" and ranks.main:
        report["lowering"], lowered = lower_for_run(baked, plan, example_inputs_for(plan.model))
    if writes:
        t3 = time.perf_counter()
        runfolder.write(out, plan, written, baked, report, runtime.events, lowered=lowered,
                        inputs=example_inputs_for(plan.model))
        report["timings"]["write_s"] = time.perf_counter() - t3
        if ckpt_path:
            remove_checkpoints(ckpt_path)        # the run folder is the product now
    return TrainResult(out, pruned, baked, report, history, finished=True, main=ranks.main, lowered=lowered)
