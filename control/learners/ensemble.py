"""The seeds of a PRESA / CPL-only run trained as one batched ensemble (``torch.func``), member for member.

Design decisions:

- An ensemble is built *from* M ordinary ``PresaLearner`` s (same config and dataset, one per
  seed): each keeps its own feedback (``presa_feedback_for_goals`` is seeded), its own numpy
  ``rng`` (so its own minibatches, drawn exactly as ``PresaLearner.train_step`` draws them), its
  own Lagrange multiplier and its own run folder. Only the policy update is batched: the
  members' policy and reference weights are stacked (``torch.func.stack_module_state``,
  leading dim M) and the per-segment sums ``S = -sum_t ||mu(s_t, g) - a_t||^2`` of all members
  come from one batched forward over (M, B, L, .) segments: each linear layer one
  ``torch.baddbmm`` over the stacked weights (``torch.func.vmap`` of ``functional_call`` for a
  network of other layer types; the first was 1.5x faster at smoke widths on one CPU thread,
  where dispatch dominates).
- The loss is the sum of the members' own losses, each computed by that member's own code
  (``PresaLearner.bc_loss`` / ``preference_step_terms``: the core's ``cpl_loss``,
  ``safety_prob`` and ``presa_lagrangian`` with its own nu); a member's weights get exactly its
  own gradient (no term couples two members). One Adam over the stacked tensors is M Adams:
  Adam is elementwise and the members share its hyper-parameters; its state is stacked from,
  and written back to, the members' optimisers. The BC warm-up's end (``pi_ref`` frozen, a
  fresh optimiser) happens at the same step for all members, as in a single run.
- So a member trained in an ensemble equals the separately trained run of its seed up to
  float rounding of the batched matmuls (``tests/control/test_ensemble.py``: 1e-5), and
  :meth:`PresaEnsemble.sync` writes the stacked state back into the member learners before
  anything reads them (validation, checkpoints, evaluation); their checkpoints are ordinary
  single-run checkpoints, so an ensemble run resumes as an ensemble or as single runs.
- :func:`run_ensemble` drives one ``base.LearnerRun`` per member. Members whose checkpoints
  stand at different steps (a kill between two members' checkpoint writes) are first
  caught up alone to the furthest one, then trained together.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from control.feedback import gather_segments
from control.learners.base import LearnerRun
from control.learners.presa import PresaLearner
from control.policies import unit_variance_segment_logps
from llm_safepref.core.schema import CHOSEN, REJECTED, Metric

__all__ = ["ENSEMBLE_METHODS", "PresaEnsemble", "run_ensemble"]

#: Methods whose seeds can train as one ensemble (their learners are ``PresaLearner`` s).
ENSEMBLE_METHODS = ("presa", "cpl", "presa_k0.5", "presa_k2")


class PresaEnsemble:
    """M ``PresaLearner`` s of one config trained by one batched update (module docstring)."""

    def __init__(self, learners: Sequence[PresaLearner]):
        if not learners:
            raise ValueError("an ensemble needs at least one member")
        first = learners[0]
        for ln in learners:
            if not isinstance(ln, PresaLearner):
                raise TypeError(f"ensemble members must be PresaLearner s (presa, cpl), got {type(ln).__name__}")
            if ln.config != first.config or ln.ds is not first.ds or type(ln) is not type(first):
                raise ValueError("ensemble members must share one learner class, config and dataset; seeds "
                                 f"{first.seed} and {ln.seed} differ")
        if len({ln.seed for ln in learners}) != len(learners):
            raise ValueError(f"repeated seeds in the ensemble: {[ln.seed for ln in learners]}")
        self.learners = list(learners)
        self.config = first.config
        # A stateless copy of the architecture; functional_call runs it with each member's weights.
        self.template = copy.deepcopy(first.pi).to("meta")
        self._plain_mlp = all(isinstance(x, (torch.nn.Linear, torch.nn.ReLU)) for x in self.template.net)
        self.params, self.buffers = stack_module_state([ln.pi for ln in learners])  # name -> (M, ...)
        self.ref_params, self.ref_buffers = stack_module_state([ln.pi_ref for ln in learners])
        self.opt = self._stacked_adam([ln.optimizers["policy"] for ln in learners])

    # -- optimiser state: stacked from / written back to the members' Adams
    def _stacked_adam(self, member_opts: Sequence[torch.optim.Optimizer]) -> torch.optim.Adam:
        opt = torch.optim.Adam(list(self.params.values()), lr=self.config.lr)
        states = [o.state_dict() for o in member_opts]
        if states[0]["state"]:
            stacked = {}
            for i in states[0]["state"]:
                per = [st["state"][i] for st in states]
                steps = {float(p["step"]) for p in per}
                if len(steps) != 1:
                    raise ValueError(f"members' optimisers stand at different steps {sorted(steps)}")
                stacked[i] = {"step": per[0]["step"].clone(),
                              **{k: torch.stack([p[k] for p in per]) for k in ("exp_avg", "exp_avg_sq")}}
            opt.load_state_dict({"state": stacked, "param_groups": opt.state_dict()["param_groups"]})
        return opt

    @torch.no_grad()
    def sync(self) -> None:
        """Write the stacked weights and optimiser state back into every member learner."""
        state = self.opt.state_dict()["state"]
        for m, ln in enumerate(self.learners):
            ln.pi.load_state_dict({**{k: v[m] for k, v in self.params.items()},
                                   **{k: v[m] for k, v in self.buffers.items()}})
            ln.pi_ref.load_state_dict({**{k: v[m] for k, v in self.ref_params.items()},
                                       **{k: v[m] for k, v in self.ref_buffers.items()}})
            opt = ln.optimizers["policy"]
            member = {i: {"step": st["step"].clone(), "exp_avg": st["exp_avg"][m].clone(),
                          "exp_avg_sq": st["exp_avg_sq"][m].clone()} for i, st in state.items()}
            opt.load_state_dict({"state": member, "param_groups": opt.state_dict()["param_groups"]})

    # -- the batched forward
    def _forward(self, params, buffers, obs: torch.Tensor, goals: torch.Tensor) -> torch.Tensor:
        """Every member's ``GoalConditionedPolicy.forward`` at once: (M, B, L, obs_dim), (M, B, 1, g) -> (M, B, L, A).

        Stacked weights: each ``nn.Linear`` of the MLP is one ``baddbmm`` over the members (the
        same math as the module, in one kernel call instead of M); any other layer type falls
        back to ``vmap`` over ``functional_call``.
        """
        if not self._plain_mlp:
            return vmap(lambda p, b, o, g: functional_call(self.template, (p, b), (o, g)))(params, buffers, obs, goals)
        m, b, L, _ = obs.shape
        x = (obs - buffers["obs_mean"][:, None, None, :]) / buffers["obs_std"][:, None, None, :]
        g = (goals / buffers["goal_scale"][:, None, None, :]).expand(m, b, L, goals.shape[-1])
        h = torch.cat([x, g], -1).reshape(m, b * L, -1)  # (M, B L, obs_dim + g)
        for i, layer in enumerate(self.template.net):
            if isinstance(layer, torch.nn.Linear):  # h W^T + bias, per member
                h = torch.baddbmm(params[f"net.{i}.bias"][:, None, :], h, params[f"net.{i}.weight"].transpose(1, 2))
            else:
                h = torch.relu(h)
        return torch.tanh(h).reshape(m, b, L, -1)

    def _sums(self, params, buffers, starts: np.ndarray, goals: torch.Tensor) -> torch.Tensor:
        """(M, B) sums of the segments starting at ``starts`` (M, B) under each member's goals (M, B, 1, g)."""
        m, b = starts.shape
        seg = gather_segments(self.learners[0].ds, starts.ravel(), self.config.segment_length)
        obs = torch.as_tensor(seg["observations"], dtype=torch.float32).reshape(m, b, *seg["observations"].shape[1:])
        act = torch.as_tensor(seg["actions"], dtype=torch.float32)  # (M B, L, A)
        mean = self._forward(params, buffers, obs, goals).reshape(act.shape)
        return unit_variance_segment_logps(mean, act).reshape(m, b)  # CPL's S = -sum_t ||mu - a||^2

    def train_step(self, step: int) -> list[dict[str, float]]:
        """One step of every member (``PresaLearner.train_step``'s, batched); each member's metrics."""
        cfg = self.config
        batches = [ln.sample_batch() for ln in self.learners]  # each member's own rng: its own minibatch
        idx = np.stack([b[0] for b in batches])  # (M, B)
        goals = torch.stack([b[1] for b in batches])  # (M, B, 1, goal_dim)
        fb_c = np.stack([ln.feedback[CHOSEN][i] for ln, i in zip(self.learners, idx)])
        fb_r = np.stack([ln.feedback[REJECTED][i] for ln, i in zip(self.learners, idx)])
        if step < cfg.bc_warmup_steps:
            s_c, s_r = self._sums(self.params, self.buffers, fb_c, goals), self._sums(self.params, self.buffers,
                                                                                      fb_r, goals)
            losses = [ln.bc_loss(s_c[m], s_r[m]) for m, ln in enumerate(self.learners)]
            self.opt.zero_grad()
            torch.stack(losses).sum().backward()
            self.opt.step()
            return [{Metric.LOSS: x.item(), Metric.BC_LOSS: x.item()} for x in losses]
        if step == cfg.bc_warmup_steps:
            # Freeze pi_ref = the BC policy of every member; a fresh optimiser for the preference phase (TraC).
            self.ref_params = {k: v.detach().clone() for k, v in self.params.items()}
            self.ref_buffers = {k: v.detach().clone() for k, v in self.buffers.items()}
            self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr)
        s_c = self._sums(self.params, self.buffers, fb_c, goals)
        s_r = self._sums(self.params, self.buffers, fb_r, goals)
        with torch.no_grad():
            r_c = self._sums(self.ref_params, self.ref_buffers, fb_c, goals)
            r_r = self._sums(self.ref_params, self.ref_buffers, fb_r, goals)
        parts = [ln.preference_step_terms(s_c[m], s_r[m], r_c[m], r_r[m], idx[m])
                 for m, ln in enumerate(self.learners)]
        self.opt.zero_grad()
        torch.stack([loss for loss, _ in parts]).sum().backward()
        self.opt.step()
        return [ln.preference_step_metrics(loss, terms, s_c[m].detach(), s_r[m].detach(), r_c[m], r_r[m], idx[m])
                for m, (ln, (loss, terms)) in enumerate(zip(self.learners, parts))]


def run_ensemble(learners: Sequence[PresaLearner], out_dirs: Sequence[str | Path], *,
                 log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """``base.run_learner`` for M members at once: one run folder each, the same logs and checkpoints.

    Returns each member's ``run_learner`` result, in order.
    """
    if len(learners) != len(out_dirs):
        raise ValueError(f"{len(learners)} members and {len(out_dirs)} run folders")
    runs = [LearnerRun(ln, d, log=log) for ln, d in zip(learners, out_dirs)]
    steps = learners[0].config.steps
    target = max(r.start for r in runs)
    for r in runs:  # members checkpointed at an earlier step catch up alone first
        for step in range(r.start, target):
            r.record(step, r.learner.train_step(step))
    if target < steps:
        ens = PresaEnsemble(learners)
        for step in range(target, steps):
            metrics = ens.train_step(step)
            if any(r.needs_state(step + 1) for r in runs):
                ens.sync()
            for r, m in zip(runs, metrics):
                r.record(step, m)
        ens.sync()
    return [r.finish() for r in runs]
