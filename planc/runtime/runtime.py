"""The pruning runtime: runs a resolved plan's phase schedule inside any training loop.

    opt = torch.optim.SGD(pruned.param_groups(lr=0.1, momentum=0.9))
    pruned.attach(opt)            # applies step 0's actions (e.g. prune a pretrained model)
    for x, y in loader:
        loss_fn(pruned.module(x), y).backward(); opt.step(); opt.zero_grad()
        pruned.step()             # advances the schedule; prunes where it says so

What happens where (one mechanism for every method; the method only scores blocks):

- entering a `dense` phase revives every block. Revived raw weights restart at exactly
  zero (they were held at zero while pruned) — except with ACDC's `masking: true`, where
  pruned raw weights keep their values behind the zero mask and come back with them. Their attention logits are left as they
  are: the softmax runs over all blocks, alive or not, so changing any logit would
  rescale every alive block and the edge would change the network's function; and the
  logit is the block's learned importance, which the dense phase keeps training (with
  the weight at zero its effective block is zero whatever its logit).
- entering `sparse`/`finetune` prunes at once (top-k by the method's score among alive
  blocks) down to the layer's target if it is not there yet, then holds the support.
- a `sparsify` phase prunes the least important alive blocks at its update steps
  following its curve (planc.runtime.schedule), ending exactly at the target.
- at every phase edge the optimizer's state is cleared (the paper calls it crucial);
  at every pruning the pruned blocks' entries of the optimizer state are zeroed too, so
  momentum cannot push a pruned weight.
- pruned raw weights stay at exactly zero: their gradient is zero behind the zero mask
  and their optimizer state is zeroed, so torch's optimizers do not move them; every
  step that prunes (an edge, an update) and every state restore zeroes them all again,
  which also catches an optimizer that does (a preconditioner mixing entries), while
  the steps in between cost no pass over the weights.

Each edge changes the function only by the blocks it prunes: the masks' forward never
rescales the other blocks (BlockMask), and zeroing a pruned raw weight is invisible
behind a zero in the mask.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from planc.blocks import sparsify_grid_count
from planc.memory import keep_freed_memory
from planc import distributed, sharding
from planc.errors import RuntimeStateError
from planc.mask import BlockMask
from planc.plan.types import Phase, Plan
from planc.runtime import schedule as sched
from planc.runtime.methods import make_method, select_prune
from planc.runtime.sparse_phases import KernelPhases, valid_state
from planc.safeio import append_text, atomic_write_text

STATE_FORMAT = "planc.runtime/2"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Runtime:
    """The phase schedule of one compiled model. It is given what it works on — the plan,
    the module (whose parameters the optimizer groups cover), the masks, how to reach a
    masked layer's raw weight, and each masked layer's target sparsity — and owns the
    supports, the step and the event log. planc.runtime.access creates one per compiled
    model, on first use."""

    def __init__(self, plan: Plan, module: torch.nn.Module, masks: Mapping[str, BlockMask],
                 weight: Callable[[str], torch.nn.Parameter], targets: Mapping[str, float], *,
                 events_path: Optional[str] = None):
        self.plan = plan
        self.module = module
        self.weight = weight
        self.phases = tuple(self.plan.schedule.phases)
        self.method = make_method(self.plan.method)
        if self.plan.targets.budget != "per_layer":
            raise RuntimeStateError(
                f"targets.budget {self.plan.targets.budget!r} is not implemented by the runtime; "
                "use 'per_layer' (the paper's choice: per-layer uniform pruning beat global pruning)")
        self.masks: Dict[str, BlockMask] = dict(masks)
        missing = [n for n in self.masks if n not in targets]
        if missing:
            raise RuntimeStateError(f"no target sparsity known for masked layers {missing}")
        self.targets = {n: float(targets[n]) for n in self.masks}
        for name, mask in self.masks.items():
            self.method.check(name, mask)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.t = 0                     # optimizer steps completed
        self.phase_index = -1
        self.started = False
        self.events: List[dict] = []
        self.events_path = events_path
        # fixed-support phases on the block-sparse kernels (planc.runtime.sparse_phases); the
        # kernels are float32 code, so a bfloat16 autocast run keeps every layer dense
        setting = False if plan.train.precision == "bfloat16" else plan.schedule.sparse_kernels
        self.kernels = KernelPhases(module, self.masks, weight, setting)

    def record_to(self, events_path: Optional[str]) -> None:
        """Append every event from now on to `events_path` (JSON lines; None: keep them
        in memory only). The trainer points it at the run folder's events.jsonl."""
        self.events_path = events_path

    # ---- public surface -----------------------------------------------------------
    @property
    def phase(self) -> Optional[Phase]:
        return self.phases[self.phase_index] if self.phase_index >= 0 else None

    @property
    def done(self) -> bool:
        return self.t >= (self.phases[-1].end if self.phases else 0)

    def param_groups(self, lr: Optional[float] = None, weight_decay: Optional[float] = None,
                     **kwargs) -> List[dict]:
        """Two optimizer groups: 'weights' (every parameter but the logits) and 'logits'
        (absent without attention masks). Logits use method.logits_lr (else the weights'
        lr) and method.logits_weight_decay (else the weights' decay, as in the paper).
        Other keyword arguments (momentum, betas, ...) go to both groups."""
        logits = [m.logits for m in self.masks.values() if m.logits is not None]
        logit_ids = {id(p) for p in logits}
        weights = [p for p in self.module.parameters() if id(p) not in logit_ids]
        base = dict(kwargs)
        wg = dict(base, params=weights, name="weights")
        lg = dict(base, params=logits, name="logits")
        m = self.plan.method
        for key, value, logits_value in (("lr", lr, m.logits_lr), ("weight_decay", weight_decay, m.logits_weight_decay)):
            if value is not None:
                wg[key] = float(value)
            own = logits_value if logits_value is not None else value    # the logits' own, else the weights'
            if own is not None:
                lg[key] = float(own)
        return [wg, lg] if logits else [wg]

    def attach(self, optimizer: torch.optim.Optimizer, start: bool = True) -> None:
        """The optimizer whose state is reset at phase edges. Starts the schedule (applies
        step 0's actions) if it has not started yet, unless `start` is False (a run about
        to load a checkpoint's state: step 0's pruning would only be overwritten, and
        method obs cannot prune without its calibration data). An FSDP2-sharded module is checked
        first (planc.sharding). Keeps freed memory in the process from now on
        (planc.memory; PLANC_KEEP_FREED_MEMORY=0 turns that off)."""
        sharding.check_groups(self.module)
        sharding.check_optimizer(self.module, optimizer)
        self.optimizer = optimizer
        keep_freed_memory()          # masks allocate weight-sized tensors a step (planc.memory)
        if start:
            self.start()

    def start(self) -> None:
        """Apply the actions of step 0 (e.g. prune a pretrained model when its schedule
        begins with `finetune`). Idempotent; attach() calls it."""
        if not self.started:
            self.started = True
            self._arrive(0)

    def step(self) -> None:
        """Call after every optimizer step: advance the step and apply what the schedule
        prescribes for the next one. Where it prunes (a phase edge, a sparsify update)
        it also zeroes every pruned raw weight. Between those steps nothing needs it: a
        pruned block's gradient is exactly zero (its mask is zero) and its optimizer
        state was zeroed when it was pruned, so torch's optimizers leave it at zero, and
        a step costs no pass over the weights."""
        if self.optimizer is None:
            raise RuntimeStateError(
                "attach(optimizer) before step(): the runtime resets the optimizer's state at phase edges")
        self.start()
        self.t += 1
        if self._arrive(self.t):
            self._enforce_zeros()

    def record(self, event: Mapping[str, Any]) -> None:
        """Append an event (plain JSON data) to the log, e.g. the trainer's evaluations."""
        ev = json.loads(json.dumps(dict(event)))   # plain data only, and a copy
        self.events.append(ev)
        if self.events_path:
            append_text(self.events_path, json.dumps(ev, sort_keys=True) + "\n")   # never through a link

    def sparsity(self) -> Dict[str, float]:
        """Per-layer block sparsity now."""
        return {n: 1.0 - float(m.alive.sum()) / m.num_blocks for n, m in self.masks.items()}

    def mean_sparsity(self) -> float:
        """Fraction of all masked blocks that are pruned (weighted by block count)."""
        total = sum(m.num_blocks for m in self.masks.values())
        dead = sum(m.num_blocks - int(m.alive.sum()) for m in self.masks.values())
        return dead / total if total else 0.0

    def target_blocks(self, name: str) -> int:
        """How many blocks of layer `name` are pruned at its target."""
        return sparsify_grid_count(self.masks[name].num_blocks, self.targets[name])

    def layer_report(self) -> List[dict]:
        rows = []
        for name, mask in self.masks.items():
            n, alive = mask.num_blocks, int(mask.alive.sum())
            with sharding.full_logits([mask]):
                w = sharding.full(self.weight(name).detach())   # collective when sharded
                eff = mask.effective_weight(w)
                a = mask.attention().detach()[mask.alive] if mask.logits is not None else None
            row = {
                "layer": name,
                "mode": mask.mode,
                "block": list(mask.view.block),
                "weight_shape": list(mask.view.weight_shape),
                "blocks": n,
                "alive_blocks": alive,
                "target_sparsity": self.targets[name],
                "target_alive_blocks": n - self.target_blocks(name),
                "achieved_sparsity": 1.0 - alive / n,
                "weight_sparsity": float((eff == 0).float().mean()),
            }
            if a is not None:
                row["attention_std"] = float(a.std()) if a.numel() > 1 else 0.0
                row["attention_range"] = [float(a.min()), float(a.max())] if a.numel() else None
            rows.append(row)
        return rows

    # ---- state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data: step, phase, per-layer supports and logits (tensor copies), events."""
        return {
            "format": STATE_FORMAT,
            "method": self.method.name,
            "step": self.t,
            "phase": self.phase_index,
            "started": self.started,
            "layers": {
                name: {"alive": m.alive.detach().clone(),
                       "logits": None if m.logits is None else sharding.full(m.logits.detach()).clone()}
                for name, m in self.masks.items()
            },
            "events": copy.deepcopy(self.events),
            "plan": self.plan_identity(),
            "kernels": self.kernels.state(),
        }

    def plan_identity(self) -> dict:
        """What a state is only valid for (plain data): the method and its settings, the
        phase schedule, and each masked layer's weight shape, block and target sparsity.
        load_state_dict refuses a state whose identity differs: resuming another plan's
        state would silently finish at that plan's sparsity."""
        return json.loads(json.dumps({
            "method": dataclasses.asdict(self.plan.method),
            "phases": [dataclasses.asdict(p) for p in self.phases],
            "layers": {name: {"weight_shape": list(m.view.weight_shape), "block": list(m.view.block),
                              "sparsity": self.targets[name]}
                       for name, m in sorted(self.masks.items())},
        }))

    def _check_identity(self, got: Any) -> None:
        mine = self.plan_identity()
        if got == mine:
            return
        if not isinstance(got, Mapping):
            raise RuntimeStateError("the runtime state carries no plan identity (written by an older planc, "
                                    "or corrupt); it cannot be checked against this plan")
        for key, what in (("method", "method settings"), ("phases", "phase schedule")):
            if got.get(key) != mine[key]:
                raise RuntimeStateError(f"the runtime state was written by a different plan: its {what} differ "
                                        f"(state {_short(got.get(key))}, plan {_short(mine[key])})")
        theirs = got.get("layers") if isinstance(got.get("layers"), Mapping) else {}
        for name, entry in mine["layers"].items():
            if theirs.get(name) != entry:
                raise RuntimeStateError(f"the runtime state was written by a different plan: layer {name!r} "
                                        f"is {_short(theirs.get(name))} there, {_short(entry)} here")
        raise RuntimeStateError(f"the runtime state was written by a different plan: its layers are "
                                f"{_short(sorted(theirs))}, this plan's {_short(sorted(mine['layers']))}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict(). Every field is set absolutely (nothing depends on an
        earlier call) and `state` is not modified. Checks everything before changing
        anything."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise RuntimeStateError(f"expected a runtime state of format {STATE_FORMAT!r}, got {got!r}")
        if state.get("method") != self.method.name:
            raise RuntimeStateError(f"expected a state of method {self.method.name!r}, got {state.get('method')!r}")
        step, phase = state.get("step"), state.get("phase")
        if not isinstance(step, int) or step < 0:
            raise RuntimeStateError(f"expected a non-negative integer step, got {step!r}")
        if not isinstance(phase, int) or not -1 <= phase < len(self.phases):
            raise RuntimeStateError(f"expected a phase index in [-1, {len(self.phases)}), got {phase!r}")
        self._check_identity(state.get("plan"))
        layers = state.get("layers")
        if not isinstance(layers, Mapping) or not all(isinstance(e, Mapping) for e in layers.values()):
            raise RuntimeStateError("expected the state's layers as a mapping of layer name to {alive, logits}")
        if set(layers) != set(self.masks):
            raise RuntimeStateError(
                f"expected layers {sorted(self.masks)}, got {sorted(layers)}")
        for name, mask in self.masks.items():
            entry = layers[name]
            alive = entry.get("alive")
            if not isinstance(alive, torch.Tensor) or tuple(alive.shape) != mask.view.grid:
                raise RuntimeStateError(f"layer {name!r}: expected an alive grid of shape {mask.view.grid}, "
                                        f"got {getattr(alive, 'shape', type(alive).__name__)}")
            logits = entry.get("logits")
            if (logits is None) != (mask.logits is None):
                raise RuntimeStateError(f"layer {name!r}: logits present in the state and the mask disagree")
            if logits is not None and tuple(logits.shape) != mask.view.grid:
                raise RuntimeStateError(f"layer {name!r}: expected logits of shape {mask.view.grid}, "
                                        f"got {tuple(logits.shape)}")
        kernels = state.get("kernels") or {}
        if not valid_state(kernels, self.masks):
            raise RuntimeStateError("expected the state's kernels as {now: {layer: decision}, "
                                    "timed: {layer: [decision, density]}} over this model's layers")
        events = state.get("events") or []
        if not isinstance(events, list) or not all(isinstance(e, Mapping) for e in events):
            raise RuntimeStateError("expected the state's events as a list of mappings")
        with torch.no_grad():
            for name, mask in self.masks.items():
                entry = layers[name]
                mask.alive.copy_(entry["alive"].to(torch.bool))
                if mask.logits is not None:
                    sharding.copy_(mask.logits, entry["logits"])
        self.t = step
        self.phase_index = phase
        self.started = bool(state.get("started", True))
        self.events = copy.deepcopy(list(events))
        self._enforce_zeros()
        self.kernels.restore(kernels, self.phase.kind if self.phase is not None else None)
        if self.events_path:
            self._rewrite_log()

    # ---- the mechanism ------------------------------------------------------------
    def _arrive(self, t: int) -> bool:
        """Apply step t's actions; whether there were any (a phase entered, an update)."""
        entered = [i for i in sched.phases_starting_at(self.phases, t) if i > self.phase_index]
        for i in entered:
            self._enter(i, t)
        phase = self.phase
        if not entered and phase is not None and phase.kind == "sparsify":
            progress = sched.update_progress(phase, t)
            if progress is not None:
                self._sparsify_update(phase, progress, t)
                return True
        return bool(entered)

    def _enter(self, index: int, t: int) -> None:
        phase = self.phases[index]
        self.phase_index = index
        changed: Dict[str, int] = {}
        if phase.kind == "dense":
            for name, mask in self.masks.items():
                dead = int((~mask.alive).sum())
                if dead:
                    if not self.method.keeps_pruned_weights:
                        self._zero_blocks(name, ~mask.alive)   # revived blocks restart at zero
                    mask.alive.fill_(True)
                changed[name] = dead
        elif phase.kind in ("sparse", "finetune"):
            for name in self.masks:
                changed[name] = self._prune_to(name, self.target_blocks(name))
        elif phase.kind != "sparsify":
            raise RuntimeStateError(f"unknown phase kind {phase.kind!r} in phase {index}")
        self._reset_optimizer()
        self.kernels.enter(phase.kind)
        ev = {"event": "phase", "step": t, "phase": index, "kind": phase.kind,
              "sparsity": self._rounded_sparsity()}
        if phase.kind == "dense":
            ev["revived"] = changed
        elif phase.kind != "sparsify":
            ev["pruned"] = changed
        else:
            att = self._attention_summary()      # planc.report plots these at each sparsify edge
            if att:
                ev["attention"] = att
        self.record(ev)
        if phase.kind == "sparsify":
            progress = sched.update_progress(phase, t)
            if progress is not None:
                self._sparsify_update(phase, progress, t)

    def _sparsify_update(self, phase: Phase, progress: float, t: int) -> None:
        curve = phase.curve or self.method.default_curve
        c = phase.c if phase.c is not None else self.plan.method.c
        pruned: Dict[str, int] = {}
        for name, mask in self.masks.items():
            s = sched.scheduled_sparsity(self.targets[name], progress, curve=curve, c=c,
                                         initial=phase.initial)
            final = self.target_blocks(name)
            count = final if progress >= 1.0 else min(final, sparsify_grid_count(mask.num_blocks, s))
            pruned[name] = self._prune_to(name, count)
        self.kernels.support_changed()
        self.record({"event": "prune", "step": t, "phase": self.phase_index, "progress": progress,
                     "pruned": pruned, "sparsity": self._rounded_sparsity()})

    @torch.no_grad()
    def _attention_summary(self, bins: int = 24) -> Dict[str, dict]:
        """Per attention-mode layer, the distribution of A over its alive blocks: std,
        min, max and a histogram (`bins` equal bins over [min, max]). Plain data."""
        out: Dict[str, dict] = {}
        for name, mask in self.masks.items():
            if mask.logits is None:
                continue
            with sharding.full_logits([mask]):          # collective when sharded
                a = mask.attention().detach().float()[mask.alive].flatten()
            if a.numel() == 0:
                continue
            lo, hi = float(a.min()), float(a.max())
            counts = torch.histc(a, bins=bins, min=lo, max=hi if hi > lo else lo + 1e-6)
            out[name] = {"std": round(float(a.std()) if a.numel() > 1 else 0.0, 6),
                         "min": round(lo, 6), "max": round(hi, 6),
                         "hist": [int(c) for c in counts.tolist()]}
        return out

    @torch.no_grad()
    def _prune_to(self, name: str, total: int) -> int:
        """Prune the least important alive blocks of `name` until `total` are dead.
        Returns how many it pruned now."""
        mask = self.masks[name]
        if int((~mask.alive).sum()) >= total:
            return 0
        if self.method.calibrated:
            raise RuntimeStateError(
                f"method {self.method.name!r} prunes from calibration data, but layer {name!r} is not at its target: "
                "call planc.obs_prune(pruned, batches) before attach() or start() (planc apply does)")
        weight = sharding.full(self.weight(name))   # scores see the whole weight (collective when sharded)
        with sharding.full_logits([mask]):
            scores = self.method.score(mask, weight)
        newly = select_prune(scores, mask.alive, total)
        newly = distributed.broadcast_decision(newly)   # every rank applies rank 0's choice (planc.distributed)
        mask.alive &= ~newly
        self._zero_blocks(name, newly, weight=not self.method.keeps_pruned_weights)
        return int(newly.sum())

    @torch.no_grad()
    def _zero_blocks(self, name: str, blocks: torch.Tensor, weight: bool = True) -> None:
        """Zero the raw weight (unless `weight` is False: masking) on `blocks` (a bool
        grid) and its optimizer-state entries."""
        if not bool(blocks.any()):
            return
        mask = self.masks[name]
        param = self.weight(name)
        state = self.optimizer.state.get(param, {}).values() if self.optimizer is not None else ()
        targets = ([param] if weight else []) + [value for value in state
                                                 if isinstance(value, torch.Tensor) and value.shape == param.shape]
        self._zero(mask, targets, blocks.to(torch.bool))

    @torch.no_grad()
    def _enforce_zeros(self) -> None:
        if self.method.keeps_pruned_weights:       # masking: the zero mask alone hides them
            return
        for name, mask in self.masks.items():
            if not bool(mask.alive.all()):
                self._zero(mask, [self.weight(name)], ~mask.alive)

    @staticmethod
    def _zero(mask: BlockMask, tensors, blocks: torch.Tensor) -> None:
        """Zero `blocks` (a bool grid) of each tensor of the weight's shape: in place over
        a blocked view (no full-size mask), or on this rank's rows of a sharded tensor."""
        hit = None
        for t in tensors:
            if sharding.is_sharded(t):
                hit = mask.view.expand(blocks) if hit is None else hit
                sharding.fill_(t, hit)                 # a sharded tensor: this rank's rows only
            else:
                mask.view.zero_blocks_(t, blocks)

    def _reset_optimizer(self) -> None:
        if self.optimizer is not None:
            self.optimizer.state.clear()

    def _rounded_sparsity(self) -> Dict[str, float]:
        return {n: round(s, 6) for n, s in self.sparsity().items()}

    def _rewrite_log(self) -> None:
        atomic_write_text(self.events_path, "".join(json.dumps(ev, sort_keys=True) + "\n" for ev in self.events))
