"""The learners of the control benchmark: thin loops around the shared loss core, one module per method.

``train(task, method, seed, scale, out_dir)`` is the one contract: it loads the task's behaviour
dataset, builds the method's learner from its per-scale config (``overrides`` change fields),
trains it with the common resumable loop (``base.run_learner``: ``out_dir/log.jsonl``,
``out_dir/checkpoint.pt``), evaluates the policy on held-out downstream goals and returns
the run's record (config, data version, metrics, per-goal evaluation, seconds).

Methods (:data:`METHODS`):

========== ====================================================================================
presa      PRESA: CPL on preferences + Lagrangian safety-label term (``presa``)
cpl        CPL-only: PRESA's preference-only ablation (``cpl``)
bc_safe    behaviour cloning on segments within the cost threshold (``bc_safe``)
task_only  TD3+BC on the task reward (``task_only``)
oracle     TD3+BC on task reward - 10 x true cost (``oracle``)
rc_<w>     TD3+BC on (1 - w) r_task + w r_hat, one Bradley–Terry r_hat of the crowd (``rc``);
           w in 0.25, 0.5, 0.75; needs the ``reward_model`` artefact
td3bc_lag  TD3+BC with a cost critic and a (PID) Lagrange multiplier on E[C] <= kappa (``td3bc_lag``)
safe_cpl   Safe-CPL: latent-user CPL on the crowd (encoder trained jointly), then stage 2 (``safe_cpl``)
safe_vpl   Safe-VPL: VAE reward model of the crowd, z-conditioned TD3+BC, then stage 2 (``safe_vpl``)
safe_*_    ``safe_cpl_shared`` / ``safe_vpl_shared``: the same with the authors' shared encoder: the
shared     ``latent_encoder`` artefact (Safe-VPL's VAE reward model, once per (task, seed)), frozen
========== ====================================================================================

Imbalance arms (``<method>_imbalanced``: ``rc_0.5_imbalanced``, ``safe_cpl_imbalanced``,
``safe_vpl_imbalanced``) are the same learners on a crowd in which user 0 labels
``IMBALANCE_WEIGHT`` (4) times as many query sets as each other user
(``reward_model.imbalanced_user_weights``): one setting shared by the three, RC's through its
own ``reward_model_imbalanced`` artefact.

Design decisions:

- Everything a learner needs from the loss side is ``llm_safepref.core`` (through
  ``control.objectives`` for PRESA); the RL machinery (TD3+BC critics, the reward net) is
  control's own.
- Shared artefacts (:data:`ARTEFACTS`: RC's reward models, balanced and imbalanced; the latent
  encoder of the ``_shared`` methods; PRESA's BC warm-up, which the PRESA-type methods
  ``share``: used when it matches their config, trained inline otherwise) are
  trained once per (task, seed) by :func:`train_artefact`, resumable like a run, and passed to
  the methods (or artefacts) that ``require`` them as folders, under the learner keyword the
  artefact ``provides`` (both reward models reach RC as ``reward_model=``). An artefact says
  which files it writes (its learner's ``output_files``, :func:`artefact_files`), so the suite
  knows when one is complete. Safe-CPL and Safe-VPL need none: each trains its own encoder
  and its stage 1 and stage 2 in one resumable run (``control.learners.composition``).
- Config overrides come as ``{"field": value}`` or ``{"objective.safety_delta": value}`` for
  a nested config; strings (from the command line) are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from control.data import DataError, VERSION, dataset_path, load_dataset
from control.learners import bc_safe, cpl, oracle, presa, rc, reward_model, safe_cpl, safe_vpl, task_only, td3bc_lag
from control.learners.base import CheckpointMismatch, evaluate_downstream, run_learner
from control.learners.ensemble import ENSEMBLE_METHODS, run_ensemble
from control.learners.validation import read_validation, summarize_validation

__all__ = ["MethodSpec", "METHODS", "ARTEFACTS", "method_names", "get_method", "default_config", "apply_overrides",
           "artefact_files", "artefact_keyword", "train", "train_ensemble", "ENSEMBLE_METHODS", "train_artefact",
           "load_task_dataset", "MissingDataset", "data_version", "CheckpointMismatch", "build_command",
           "THRESHOLD_SCALES", "THRESHOLD_METHODS", "threshold_arm"]


@dataclass(frozen=True)
class MethodSpec:
    """A method: its learner class, per-scale config factory, required artefacts, one-line description."""

    name: str
    learner: type
    config_for: Callable[..., Any]
    description: str
    defaults: tuple[tuple[str, Any], ...] = ()
    requires: tuple[str, ...] = ()
    #: Artefacts the suite trains once per (task, seed) and passes when it plans the method, which the method
    #: uses when they match its config and does without otherwise (PRESA-type runs' ``bc_warmup``).
    shares: tuple[str, ...] = ()
    #: Per-task config defaults ``task -> {field: value}`` (the imbalance arms' user weights).
    task_defaults: Callable[[str], dict[str, Any]] | None = None
    #: Artefacts only: the learner keyword under which dependents receive its folder (default: its name).
    provides: str = ""

    @property
    def artefacts(self) -> tuple[str, ...]:
        """Every artefact the suite trains before this method: ``requires``, then ``shares``."""
        return (*self.requires, *self.shares)


METHODS: dict[str, MethodSpec] = {
    "presa": MethodSpec("presa", presa.PresaLearner, presa.config_for,
                        "PRESA: CPL preferences + Lagrangian safety-label term", shares=("bc_warmup",)),
    "cpl": MethodSpec("cpl", cpl.CplLearner, cpl.config_for, "CPL-only: PRESA without its safety term",
                      shares=("bc_warmup",)),
    "bc_safe": MethodSpec("bc_safe", bc_safe.BCSafeLearner, bc_safe.config_for,
                          "behaviour cloning on segments within the cost threshold"),
    "task_only": MethodSpec("task_only", task_only.TaskOnlyLearner, task_only.config_for,
                            "TD3+BC on the task reward"),
    "oracle": MethodSpec("oracle", oracle.OracleLearner, oracle.config_for, "TD3+BC on task reward - 10 x cost"),
    **{f"rc_{w:g}": MethodSpec(f"rc_{w:g}", rc.RCLearner, rc.config_for,
                               f"TD3+BC on {1 - w:g} r_task + {w:g} r_hat (crowd Bradley-Terry reward)",
                               defaults=(("weight", w),), requires=("reward_model",)) for w in rc.RC_WEIGHTS},
    "td3bc_lag": MethodSpec("td3bc_lag", td3bc_lag.TD3BCLagLearner, td3bc_lag.config_for,
                            "TD3+BC with a cost critic and a PID Lagrange multiplier on E[C] <= kappa"),
    "safe_cpl": MethodSpec("safe_cpl", safe_cpl.SafeCPLLearner, safe_cpl.config_for,
                           "Safe-CPL: latent-user CPL on the crowd, then composition over the prior (stage 2)"),
    "safe_vpl": MethodSpec("safe_vpl", safe_vpl.SafeVPLLearner, safe_vpl.config_for,
                           "Safe-VPL: VAE reward model, z-conditioned TD3+BC, then composition (stage 2)"),
}

METHODS.update({
    "safe_cpl_shared": MethodSpec("safe_cpl_shared", safe_cpl.SafeCPLLearner, safe_cpl.config_for,
                                  "Safe-CPL the authors' way: encoder + prior frozen from Safe-VPL's reward model",
                                  defaults=(("shared_encoder", True),), requires=("latent_encoder",)),
    "safe_vpl_shared": MethodSpec("safe_vpl_shared", safe_vpl.SafeVPLLearner, safe_vpl.shared_config_for,
                                  "Safe-VPL continuing from the shared latent_encoder artefact (its phase 1)",
                                  requires=("latent_encoder",)),
})

_IMBALANCED = lambda task: {"user_weights": reward_model.imbalanced_user_weights(task)}  # noqa: E731

#: The imbalance arms: ``<base method>_imbalanced`` (the issue's scope: RC(0.5), Safe-CPL, Safe-VPL).
METHODS.update({
    "rc_0.5_imbalanced": dataclasses.replace(
        METHODS["rc_0.5"], name="rc_0.5_imbalanced", requires=("reward_model_imbalanced",),
        description="RC(0.5) on an imbalanced crowd (user 0 labels 4x as often)"),
    "safe_cpl_imbalanced": dataclasses.replace(
        METHODS["safe_cpl"], name="safe_cpl_imbalanced", task_defaults=_IMBALANCED,
        description="Safe-CPL on an imbalanced crowd (user 0 labels 4x as often)"),
    "safe_vpl_imbalanced": dataclasses.replace(
        METHODS["safe_vpl"], name="safe_vpl_imbalanced", task_defaults=_IMBALANCED,
        description="Safe-VPL on an imbalanced crowd (user 0 labels 4x as often)"),
})

#: The PRESA table's cost thresholds: kappa x each scale. The base method is the scale-1 arm.
THRESHOLD_SCALES = (0.5, 1.0, 2.0)
#: The methods whose training reads the threshold (CPL-only does not: its one run is judged at every threshold).
THRESHOLD_METHODS = ("presa", "bc_safe", "td3bc_lag")


def threshold_arm(method: str, scale: float) -> str:
    """The method name of ``method`` at threshold kappa x ``scale`` (``presa_k0.5``; ``presa`` at 1)."""
    return method if scale == 1.0 else f"{method}_k{scale:g}"


#: The threshold arms ``<method>_k<s>``: the same learner with ``cost_threshold_scale`` = s.
METHODS.update({
    threshold_arm(m, s): dataclasses.replace(
        METHODS[m], name=threshold_arm(m, s), defaults=(*METHODS[m].defaults, ("cost_threshold_scale", s)),
        description=f"{METHODS[m].description}, cost threshold kappa x {s:g}")
    for m in THRESHOLD_METHODS for s in THRESHOLD_SCALES if s != 1.0
})

#: Shared artefacts: name -> (learner class, config factory, the artefacts they need, keyword they provide).
ARTEFACTS: dict[str, MethodSpec] = {
    "reward_model": MethodSpec("reward_model", reward_model.RewardModelLearner, reward_model.config_for,
                               "Bradley-Terry reward model on the crowd's pooled preferences"),
    "reward_model_imbalanced": MethodSpec(
        "reward_model_imbalanced", reward_model.RewardModelLearner, reward_model.config_for,
        "Bradley-Terry reward model on an imbalanced crowd's pooled preferences (user 0 labels 4x as often)",
        task_defaults=_IMBALANCED, provides="reward_model"),
    "bc_warmup": MethodSpec("bc_warmup", presa.BCWarmupLearner, presa.warmup_config_for,
                            "PRESA's BC warm-up, shared by PRESA, CPL-only and PRESA's threshold arms"),
    "latent_encoder": MethodSpec("latent_encoder", safe_vpl.LatentEncoderLearner, safe_vpl.encoder_config_for,
                                 "Safe-VPL's VAE reward model (encoder, prior, r(s, a, z)), shared by the _shared "
                                 "latent methods"),
}


def artefact_files(kind: str) -> tuple[str, ...]:
    """The files an artefact writes into its folder (its learner's ``output_files``); all must exist when done."""
    if kind not in ARTEFACTS:
        raise ValueError(f"unknown artefact {kind!r}; valid artefacts: {', '.join(ARTEFACTS)}")
    return tuple(ARTEFACTS[kind].learner.output_files)


def artefact_keyword(kind: str) -> str:
    """The learner keyword under which a dependent receives the artefact's folder."""
    return ARTEFACTS[kind].provides or kind


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------- configs


def _convert(text: str, current: Any, name: str) -> Any:
    """A command-line string as the type of the field's current value (JSON for None / nested)."""
    if not isinstance(text, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config, overrides: Mapping[str, Any] | None):
    """A copy of ``config`` with ``overrides`` (``field`` or ``nested.field``); unknown names list the valid ones."""
    if not overrides:
        return config
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        (nested.setdefault(head, {}).__setitem__(rest, value) if rest else flat.__setitem__(head, value))
    names = {f.name for f in dataclasses.fields(config)}
    for key in [*flat, *nested]:
        if key not in names:
            raise ValueError(f"{type(config).__name__} has no field {key!r}; fields: {', '.join(sorted(names))}")
    changes = {k: _convert(v, getattr(config, k), k) for k, v in flat.items()}
    for head, sub in nested.items():
        changes[head] = apply_overrides(getattr(config, head), sub)
    return dataclasses.replace(config, **changes)


def default_config(method: str, task: str, scale: str, overrides: Mapping[str, Any] | None = None):
    """The config of ``method`` on ``task`` at ``scale`` (``smoke``, ``small``, ``paper``), with overrides."""
    spec = METHODS.get(method) or ARTEFACTS.get(method)
    if spec is None:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    base = {**dict(spec.defaults), **(spec.task_defaults(task) if spec.task_defaults else {})}
    return apply_overrides(spec.config_for(task, scale, **base), overrides)


# --------------------------------------------------------------------------- data


class MissingDataset(FileNotFoundError):
    """The behaviour dataset of a run is not built; the message gives the build command."""


def build_command(task: str, scale: str, data_seed: int, data_dir: str | None) -> str:
    """The command that builds a missing dataset (``task`` may be several, space-separated)."""
    cmd = f"python -m control build-data --tasks {task} --scale {scale} --seed {data_seed}"
    return cmd + (f" --data_dir {data_dir}" if data_dir else "")


def load_task_dataset(task: str, scale: str, data_seed: int = 0, data_dir: str | None = None):
    path = dataset_path(task, scale, data_seed, data_dir)
    if not path.exists() or not path.with_suffix(".json").exists():
        raise MissingDataset(f"no {scale} dataset for task {task!r} (seed {data_seed}) at {path}; build it with: "
                             f"{build_command(task, scale, data_seed, data_dir)}")
    ds = load_dataset(path)
    if ds.meta.get("format") != VERSION:
        raise DataError(f"{path}: format {ds.meta.get('format')!r}, this code reads {VERSION!r}; rebuild with: "
                        f"{build_command(task, scale, data_seed, data_dir)} --force")
    return ds


def data_version(ds, path) -> dict[str, Any]:
    """What identifies a dataset in a run file."""
    m = ds.meta
    return {"path": str(path), "format": m.get("format"), "task": m.get("task"), "scale": m.get("scale"),
            "seed": m.get("seed"), "created_utc": m.get("created_utc"), "git_revision": m.get("git_revision"),
            "n_transitions": m.get("n_transitions"), "n_episodes": m.get("n_episodes"),
            "max_episode_steps": m.get("max_episode_steps")}


# --------------------------------------------------------------------------- train


def _config_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _prepare(task: str, method: str, scale: str, data_dir, data_seed: int, overrides):
    spec = get_method(method)
    config = default_config(method, task, scale, overrides)
    torch.set_num_threads(config.threads)
    return spec, config, load_task_dataset(task, scale, data_seed, data_dir)


def _run_record(task, method, seed, scale, config, ds, data_path, learner, trained, artefacts, t0) -> dict[str, Any]:
    evaluation = evaluate_downstream(learner.policy(), ds, config, seed)
    return {"task": task, "method": method, "seed": int(seed), "scale": scale, "config": _config_json(config),
            "data": data_version(ds, data_path),
            "metrics": {**trained["last"], **evaluation["metrics"]}, "per_goal": evaluation["per_goal"],
            "train": {k: trained[k] for k in ("steps", "resumed_from", "log", "checkpoint")},
            "validation": summarize_validation(read_validation(trained["log"])),
            "info": learner.info(), "artefacts": dict(artefacts or {}), "seconds": round(time.time() - t0, 3)}


def train(task: str, method: str, seed: int, scale: str, out_dir: str | Path, *, data_dir: str | None = None,
          data_seed: int = 0, artefacts: Mapping[str, str] | None = None,
          overrides: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and evaluate one run; resumes from ``out_dir/checkpoint.pt`` when present.

    Returns ``{"task", "method", "seed", "scale", "config", "data", "metrics", "per_goal",
    "train", "validation", "info", "artefacts", "seconds"}``; ``metrics`` holds the last logged
    training metrics and the evaluation's ``eval/...`` (``eval/normalized_reward`` and
    ``eval/normalized_cost`` are DSRL's, averaged over the held-out goals); ``validation`` the
    periodic validation curve and whether it levelled off (``control.learners.validation``).
    """
    t0 = time.time()
    spec, config, ds = _prepare(task, method, scale, data_dir, data_seed, overrides)
    learner = spec.learner(config, ds, seed, **_artefact_kwargs(f"method {method!r}", spec, artefacts))
    trained = run_learner(learner, out_dir, log=log)
    return _run_record(task, method, seed, scale, config, ds, dataset_path(task, scale, data_seed, data_dir), learner,
                       trained, artefacts, t0)


def train_ensemble(task: str, method: str, seeds: Sequence[int], scale: str, out_dirs: Sequence[str | Path], *,
                   data_dir: str | None = None, data_seed: int = 0, overrides: Mapping[str, Any] | None = None,
                   artefacts: Sequence[Mapping[str, str] | None] | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """:func:`train` for several seeds of a ``presa`` / ``cpl`` run at once, as one batched ensemble.

    ``control.learners.ensemble``: each member equals its separately trained run (float
    rounding aside), keeps its own folder in ``out_dirs`` and gets its own record (as
    :func:`train` returns it, plus ``train["ensemble"]``: the seeds trained together and the
    shared training seconds). ``artefacts`` are each member's (one mapping per seed, as
    :func:`train` takes them: its ``bc_warmup``).
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(f"method {method!r} cannot train as an ensemble; ensemble methods: "
                         f"{', '.join(ENSEMBLE_METHODS)}")
    if len(seeds) != len(out_dirs) or not seeds:
        raise ValueError(f"{len(seeds)} seeds and {len(out_dirs)} run folders; give one folder per seed")
    t0 = time.time()
    spec, config, ds = _prepare(task, method, scale, data_dir, data_seed, overrides)
    per_member = list(artefacts) if artefacts is not None else [None] * len(seeds)
    if len(per_member) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds and {len(per_member)} artefact mappings; give one per seed")
    learners = [spec.learner(config, ds, s, **_artefact_kwargs(f"method {method!r}", spec, a))
                for s, a in zip(seeds, per_member)]
    results = run_ensemble(learners, out_dirs, log=log)
    shared = round(time.time() - t0, 3)
    records = []
    for seed, learner, trained in zip(seeds, learners, results):
        rec = _run_record(task, method, seed, scale, config, ds, dataset_path(task, scale, data_seed, data_dir),
                          learner, trained, per_member[seeds.index(seed)], time.time())
        rec["seconds"] = round(shared + rec["seconds"], 3)  # the shared training time plus its own evaluation
        rec["train"]["ensemble"] = {"seeds": [int(s) for s in seeds], "train_seconds": shared}
        records.append(rec)
    return records


def _artefact_kwargs(who: str, spec: MethodSpec, artefacts: Mapping[str, str] | None) -> dict[str, str]:
    """``{learner keyword: folder}`` of the artefacts ``spec`` requires (a missing one is an error) and of
    those it shares that are given."""
    kwargs = {}
    for need in spec.requires:
        if not artefacts or need not in artefacts:
            raise ValueError(f"{who} needs the {need!r} artefact; train it with train_artefact("
                             f"{need!r}, ...) or run it through the suite, which does so first")
        kwargs[artefact_keyword(need)] = artefacts[need]
    for kind in spec.shares:
        if artefacts and kind in artefacts:
            kwargs[artefact_keyword(kind)] = artefacts[kind]
    return kwargs


def train_artefact(kind: str, task: str, seed: int, scale: str, out_dir: str | Path, *, data_dir: str | None = None,
                   data_seed: int = 0, artefacts: Mapping[str, str] | None = None,
                   overrides: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a shared artefact (``reward_model``, ...) into ``out_dir``; resumable; returns its record.

    ``artefacts`` are the folders of the artefacts it requires itself (none do today).
    """
    if kind not in ARTEFACTS:
        raise ValueError(f"unknown artefact {kind!r}; valid artefacts: {', '.join(ARTEFACTS)}")
    t0 = time.time()
    config = default_config(kind, task, scale, overrides)
    torch.set_num_threads(config.threads)
    ds = load_task_dataset(task, scale, data_seed, data_dir)
    spec = ARTEFACTS[kind]
    learner = spec.learner(config, ds, seed, **_artefact_kwargs(f"artefact {kind!r}", spec, artefacts))
    trained = run_learner(learner, out_dir, log=log)
    meta = learner.finalize(out_dir)
    return {"kind": kind, "task": task, "seed": int(seed), "scale": scale, "config": _config_json(config),
            "data": data_version(ds, dataset_path(task, scale, data_seed, data_dir)),
            "metrics": {**trained["last"], **{f"heldout/{k[8:]}": v for k, v in meta.items()
                                              if k.startswith("heldout_")}},
            "train": {k: trained[k] for k in ("steps", "resumed_from", "log", "checkpoint")},
            "info": meta, "dir": str(out_dir), "files": list(artefact_files(kind)),
            "artefacts": dict(artefacts or {}), "seconds": round(time.time() - t0, 3)}
