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

from planc import distill, distributed, precision, runfolder, sharding, timing
from planc.checkpoint import remove_checkpoints, save_state_keep_previous
from planc.errors import PlancError, PlanError, Problem, RunFolderError, RuntimeStateError
from planc.losses import compute_loss
from planc.lowering import lower_for_run
from planc.plan.factory import call_factory
from planc.plan.types import Plan
from planc.pruned import compile as planc_compile
from planc.pruned import example_inputs_for, lowering_inputs_for
from planc.runtime import Runtime
from planc.safeio import create_empty, make_folder
from torch.nn.parallel import DistributedDataParallel

CHECKPOINT = runfolder.CHECKPOINT
CKPT_FORMAT = "planc.checkpoint/1"


# ---- building things from the plan --------------------------------------------------
def make_optimizer(plan: Plan, runtime: Runtime) -> torch.optim.Optimizer:
    o = plan.train.optimizer
    if o.name == "sgd":
        groups = runtime.param_groups(lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
        return torch.optim.SGD(groups, lr=o.lr, fused=o.fused or None)
    if o.name in ("adam", "adamw"):
        groups = runtime.param_groups(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=o.lr, fused=o.fused or None)
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


def calibration_batches(loader, count: int) -> List[Any]:
    """The inputs of the first `count` batches of a fresh pass over `loader`, drawn
    without changing any random state the training's own pass will use."""
    gen = getattr(loader, "generator", None)
    gen_state = gen.get_state() if gen is not None else None
    inputs: List[Any] = []
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            inputs.append(_split_batch(batch)[0])
            if len(inputs) >= count:
                break
    if gen is not None:
        gen.set_state(gen_state)
    return inputs


def _calibrate(plan: Plan, pruned, loader, log: Callable[[str], None]) -> dict:
    """Method obs: prune once from the training data's first batches (planc.obs); the
    event the runtime records."""
    from planc.obs import obs_prune   # lazy: only plans with method obs need it

    t0 = time.perf_counter()
    batches = calibration_batches(loader, plan.method.calibration_batches)
    layers = obs_prune(pruned, batches, damp=plan.method.damp)
    seconds = time.perf_counter() - t0
    worst = max(layers, key=lambda r: r["error"]) if layers else None
    log(f"planc: block OBS pruned {len(layers)} layers on {len(batches)} calibration batches in {seconds:.0f} s"
        + (f" (largest relative output error {worst['error']:.3g}, {worst['name']})" if worst else ""))
    return {"event": "calibration", "step": 0, "batches": len(batches), "seconds": round(seconds, 2), "layers": layers}


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
    already_finished: bool = False  # resume found this plan's finished run: nothing was trained
    lowered: Any = None           # the lowered model apply kept (None: it stayed dense)


def _progress(total: int, initial: int, enabled: Optional[bool]):
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm import tqdm   # lazy, and optional: the bar is a nicety
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


SMALL_LAYER = 1 << 18          # weights of at most this many elements: one thread (see pick_threads)


def pick_threads(module: torch.nn.Module) -> int:
    """The intra-op thread count `planc apply` trains with by default: one thread when
    every weight is small (at most 2^18 elements, a 512x512 matrix): each op then takes
    microseconds, and splitting it costs more than it gives (the README's digits MLP
    trains several times faster on one thread than on two); else torch's default."""
    largest = max((p.numel() for p in module.parameters()), default=0)
    return 1 if largest <= SMALL_LAYER else torch.get_num_threads()


def train(plan: Plan, out: Optional[str] = None, *, resume: bool = False, overwrite: bool = False,
          stop_after: Optional[int] = None, progress: Optional[bool] = None, threads=None,
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
    tensors gathered from the shards.

    `threads`: torch's intra-op threads for the run: a number, "auto" (pick_threads,
    once the model is built) or None (leave torch's setting). report.json records it."""
    if threads is not None and threads != "auto":
        torch.set_num_threads(int(threads))
    ranks = distributed.join_from_environment()
    try:
        return _train(plan, out, ranks, resume=resume, overwrite=overwrite, stop_after=stop_after,
                      progress=progress, threads=threads, log=log if ranks.main else (lambda s: None))
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
        make_folder(out)
        create_empty(os.path.join(out, runfolder.EVENTS))      # a fresh run starts a fresh log
    return _Session(out, ranks.main, output)


class IntervalMeans:
    """Each distillation term's mean over the steps since the last evaluation (the run
    history's distill_*); its sums are part of the checkpoint, so resume records the same."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.steps = 0

    def add(self, terms: Dict[str, Optional[float]]) -> None:
        for k, v in terms.items():
            if v is not None:
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def take(self) -> Dict[str, float]:
        """The means, then start a new interval ({} when no step was added)."""
        means = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return means

    def state(self) -> dict:
        return {"sums": dict(self.sums), "steps": self.steps}

    def restore(self, state: dict) -> None:
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])


def _restore(state: dict, used: str, pruned, runtime: Runtime, opt, batches: "Batches",
             means: IntervalMeans) -> Tuple[List[dict], dict]:
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
        means.restore(state.get("distill_means", {"sums": {}, "steps": 0}))   # older checkpoints: none
        return list(state["history"]), dict(state["timings"])
    except RuntimeStateError as err:
        raise RunFolderError(f"{used}: {err}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        raise RunFolderError(f"{used}: its state does not fit this run ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:160]})") from None


def _precision_for(plan: Plan, model, session: _Session, ranks) -> precision.Choice:
    """The precision this run trains in: the plan's, or for `auto` the one a resumed run
    began with (its checkpoint says), else this machine's choice (rank 0's for all ranks)."""
    setting = plan.train.precision
    if setting != "auto":
        return precision.Choice(setting, "the plan's train.precision")
    output = session.output
    if output is not None and output.action == "resume" and isinstance(output.state, dict):
        began = output.state.get("precision")
        if began in precision.PRECISIONS:
            return precision.Choice(began, "the precision this run began in (its checkpoint)")
    choice = precision.choose(precision.device_type(model), sparse_kernels=plan.schedule.sparse_kernels,
                              fsdp=ranks.world > 1 and plan.train.distributed == "fsdp")
    if ranks.world > 1:
        agreed = distributed.broadcast_decision(torch.tensor([choice.chosen == "bfloat16"]))
        chosen = "bfloat16" if bool(agreed[0]) else "float32"
        if chosen != choice.chosen:
            choice = precision.Choice(chosen, "rank 0's choice")
    return choice


def _train(plan: Plan, out: Optional[str], ranks, *, resume: bool, overwrite: bool, stop_after: Optional[int],
           progress: Optional[bool], threads, log: Callable[[str], None]) -> TrainResult:
    t_start = time.perf_counter()
    if plan.model.factory is None:
        raise PlanError([plan.problem("model.factory", "the built-in trainer needs model.factory")])
    if plan.train.data is None:
        raise PlanError([plan.problem("train.data", "the built-in trainer needs train.data")])
    session = _open_output(plan, out, ranks, resume=resume, overwrite=overwrite, log=log)
    if session.output is not None and session.output.action == "finished":
        log(f"planc: {out} already holds this plan's finished run; nothing to do")
        return TrainResult(out, None, None, session.output.report, finished=True, main=ranks.main,
                           already_finished=True)
    run = _Run(plan, session, ranks, log if ranks.main else (lambda _msg: None))
    if threads == "auto":
        torch.set_num_threads(pick_threads(run.module))
    if session.output is not None and session.output.action == "resume":
        run.history, run.timings = _restore(session.output.state, session.output.state_file, run.pruned,
                                            run.runtime, run.opt, run.batches, run.distill_means)
        log(f"planc: resumed {out} at step {run.runtime.t}")
    if not run.loop(stop_after, progress if ranks.main else False):
        return TrainResult(out, run.pruned, None, {}, run.history, finished=False, main=ranks.main)
    return run.finish(t_start)


class _Run:
    """One run of the built-in trainer: the model, optimizer, runtime and data position,
    and the steps that train, evaluate, checkpoint and write the run folder."""

    def __init__(self, plan: Plan, session: _Session, ranks, log: Callable[[str], None] = lambda _msg: None):
        self.plan, self.session, self.ranks = plan, session, ranks
        _seed_all(plan.train.seed)
        model = call_factory(plan, "model.factory")
        train_loader, self.eval_loader = call_factory(plan, "train.data")
        self.precision = _precision_for(plan, model, session, ranks)
        if plan.train.precision == "auto":
            log(f"planc: train.precision auto: {self.precision.chosen} ({self.precision.reason})")
        # compiled with the precision it trains in: the runtime keeps bfloat16 runs off the float32 kernels
        trained_in = dataclasses.replace(plan, train=dataclasses.replace(plan.train, precision=self.precision.chosen))
        self.pruned = planc_compile(model, trained_in)    # example inputs: the plan's shapes
        # the teacher is taken now, before any training (its masks are still the identity)
        self.distiller = distill.from_plan(plan, self.pruned) if plan.train.distill is not None else None
        resuming = session.output is not None and session.output.action == "resume"
        calibration = None
        if self.pruned.pruning_runtime().method.calibrated and not resuming:   # a resumed run's checkpoint holds its result
            calibration = _calibrate(plan, self.pruned, train_loader, log)
        self.fsdp = ranks.world > 1 and plan.train.distributed == "fsdp"
        if self.fsdp:
            sharding.shard_module(self.pruned.module)     # before the optimizer: it must hold the sharded parameters
        self.runtime = self.pruned.pruning_runtime()
        self.runtime.record_to(session.events_path)
        if calibration is not None:
            self.runtime.record(calibration)
        self.opt = make_optimizer(plan, self.runtime)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.runtime.attach(self.opt, start=not resuming)     # a resumed run's state comes from its checkpoint
        self.batches = Batches(train_loader)
        self.history: List[dict] = []
        # per phase of the schedule: [steps timed, seconds] (report.json: timings.phase_step_ms)
        self.timings = {"train_s": 0.0, "eval_s": 0.0, "phase_steps": [[0, 0.0] for _ in plan.schedule.phases]}
        self.module = self.pruned.module
        # DDP all-reduces gradients; the pruning decisions are synchronised by planc.distributed.
        # Distillation trains through a view of the module that also records hidden states.
        trained = self.distiller.student if self.distiller is not None else self.module
        self.forward = DistributedDataParallel(trained) if ranks.world > 1 and not self.fsdp else trained
        self.last_loss, self.metric = float("nan"), None
        self.distill_means = IntervalMeans()
        self.cast = precision.autocast(self.precision.chosen, self.module)   # the training forward's context
        slower = precision.slower_on_this_cpu(plan.train.precision, self.module)   # bfloat16 asked for, not chosen
        if slower is not None:
            log(f"planc: warning: on this CPU ({timing.cpu_model()}) a bfloat16 matrix product runs at "
                f"{slower:.2f}x the float32 speed; train.precision bfloat16 will train slower than float32 here")

    def loop(self, stop_after: Optional[int], progress: Optional[bool]) -> bool:
        """Train to the end of the schedule (True), or stop after `stop_after` steps (False)."""
        total = self.plan.train.steps
        bar = _progress(total, self.runtime.t, progress)
        self.train_mode()
        try:
            while self.runtime.t < total:
                self.step()
                t = self.runtime.t
                if self.plan.train.eval_every and t % self.plan.train.eval_every == 0 and t < total:
                    self.evaluate()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(self.progress_fields(), refresh=False)
                every = self.plan.train.checkpoint_every
                if self.session.checkpoint_path and every and t % every == 0 and t < total:
                    self.checkpoint()
                if stop_after is not None and t >= stop_after and t < total:
                    return False
        finally:
            if bar is not None:
                bar.close()
        return True

    def step(self) -> None:
        t0, step, train = time.perf_counter(), self.runtime.t, self.plan.train
        factor = lr_factor(step, train.steps, train.lr_schedule, train.warmup_steps)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor
        x, y, share = self.ranks.share(*_split_batch(next(self.batches)))
        if self.distiller is not None:
            loss = self.distiller.loss(x, y, forward=self.forward, cast=self.cast)
        else:
            with self.cast():
                out = precision.as_float(self.forward(x))
            loss = compute_loss(train.loss, out, y)
        global_loss = float(self.ranks.mean(loss.detach() * share))   # every rank sees the same value
        if not math.isfinite(global_loss):
            raise PlancError(f"the loss became {global_loss} at step {step}; lower the learning rate")
        (loss * share).backward()                                     # share is exactly 1.0 on one process
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.runtime.step()
        self.last_loss = global_loss
        if self.distiller is not None:
            self.distill_means.add(vars(self.distiller.parts))
        spent = time.perf_counter() - t0
        self.timings["train_s"] += spent
        for slot, phase in zip(self.timings.get("phase_steps", ()), self.plan.schedule.phases):
            if phase.start <= step < phase.end:
                slot[0] += 1
                slot[1] += spent

    def train_mode(self) -> None:
        """Train mode, with dropout off where the plan says so."""
        self.module.train()
        if not self.plan.train.dropout:
            distill.set_dropout(self.module, False)

    def evaluate(self) -> dict:
        t1 = time.perf_counter()
        m = evaluate(self.module, self.eval_loader, self.plan.train.loss)
        if self.module.training:
            self.train_mode()                             # evaluate() restored train mode, dropout included
        self.timings["eval_s"] += time.perf_counter() - t1
        entry = {"step": self.runtime.t, "train_loss": self.last_loss, **m}
        # each distillation term's mean since the last evaluation, unweighted
        entry.update({f"distill_{k}": v for k, v in self.distill_means.take().items()})
        self.history.append(entry)
        self.runtime.record({"event": "eval", **entry})
        self.metric = m.get("accuracy", m["loss"])
        return m

    def progress_fields(self) -> dict:
        phase = self.runtime.phase
        post = {"phase": phase.kind if phase else "-", "sparsity": f"{self.runtime.mean_sparsity():.3f}",
                "loss": f"{self.last_loss:.4f}"}
        if self.metric is not None:
            post["metric"] = f"{self.metric:.2f}"
        return post

    def checkpoint(self) -> None:
        state = _checkpoint_state(self.module, self.opt, self.runtime, keep=self.session.writes)   # every rank
        if not self.session.writes:
            return
        save_state_keep_previous(self.session.checkpoint_path, {
            "format": CKPT_FORMAT, "plan": runfolder.plan_fingerprint(self.plan), "step": self.runtime.t, **state,
            "loader": self.batches.state(), "rng": _rng_state(), "history": self.history, "timings": self.timings,
            "distill_means": self.distill_means.state(), "precision": self.precision.chosen,
        })

    def finish(self, t_start: float) -> TrainResult:
        """The final evaluation, bake, lowering and run folder."""
        plan, session, timings = self.plan, self.session, self.timings
        final = self.evaluate()
        t2 = time.perf_counter()
        written = self.pruned                             # what bake and the run folder read
        if self.fsdp:                                     # full tensors gathered once, kept on rank 0 only
            written = _unsharded_copy(plan, self.module, keep=self.ranks.main)
        baked = written.bake().eval() if written is not None else None   # the product is for inference
        timings["bake_s"] = time.perf_counter() - t2
        timings["total_s"] = time.perf_counter() - t_start
        timings["steps_per_s"] = plan.train.steps / timings["train_s"] if timings["train_s"] else None
        timings["phase_step_ms"] = [round(1e3 * s / n, 3) if n else None for n, s in timings.pop("phase_steps", [])]
        report = runfolder.make_report(plan, self.runtime, final, self.history, timings)   # collective when sharded
        # which layers trained on the block-sparse kernels, as last timed (planc.runtime.sparse_phases)
        report["sparse_kernels"] = {"setting": plan.schedule.sparse_kernels, **self.runtime.kernels.state()}
        report["precision"] = self.precision.record(plan.train.precision)
        if self.ranks.world > 1:
            report["ranks"] = self.ranks.world
            report["distributed"] = plan.train.distributed
        lowered = None
        if plan.lower.backend != "dense" and self.ranks.main:
            report["lowering"], lowered = lower_for_run(baked, plan, lowering_inputs_for(plan))
        if session.writes:
            t3 = time.perf_counter()
            runfolder.write(session.out, plan, written, baked, report, self.runtime.events, lowered=lowered,
                            inputs=example_inputs_for(plan.model))
            report["timings"]["write_s"] = time.perf_counter() - t3
            if session.checkpoint_path:
                remove_checkpoints(session.checkpoint_path)        # the run folder is the product now
        return TrainResult(session.out, self.pruned, baked, report, self.history, finished=True,
                           main=self.ranks.main, lowered=lowered)
