"""The control benchmark suite: every (task, method, seed) run, resumable, on a process pool or Ray; one table.

``python -m control suite --tasks run circle --methods presa task_only oracle --seeds 0 1 2
--scale smoke --out DIR [--backend local|ray] [--jobs N] [--shard i/n] [--aggregate]``

Design decisions:

- A run is a *job*: ``(task, method, seed)``, its result ``DIR/runs/<task>__<method>__seed<s>.json``.
  A job whose result file exists (and reads as a complete run of that task, method, seed and
  scale) is skipped, so a suite is resumed by running the same command again. A run killed
  midway restarts from its last checkpoint (``control.learners.base.run_learner``). A result
  file that does not read as such a run is *corrupted*: it is named on stderr, moved aside to
  ``<name>.corrupt`` and the run is redone.
- Checkpoints, logs and shared artefacts live in the *work folder* (``--work_dir``, default
  ``<cache root>/control_suite/<out name>-<hash of its path>``), outside the results folder:
  ``runs/<run>/{checkpoint.pt,log.jsonl}``, ``artefacts/<task>__reward_model__seed<s>/``.
  Artefacts are jobs too (``kind="artefact"``), trained once per (task, seed) and finished
  before the jobs that need them (RC after its reward model); their records go to
  ``DIR/artefacts/``. :func:`plan_jobs` follows ``requires`` transitively (an artefact may
  need other artefacts), puts every artefact after the ones it needs (depth-first, a cycle is
  an error) and plans each (task, artefact, seed) once however many jobs need it. An artefact
  is done when its record exists and every file it declares (``artefact_files``) is in its
  folder; one that is not done is still skipped when every job that needs it is done
  (:func:`drop_unneeded_artefacts`), so ``--aggregate`` on another machine trains nothing.
- Backends run the same job function, :func:`execute_job`, which writes the run file with the
  toolkit's run record (``llm_safepref.core.provenance.run_record``: command, git revision,
  versions, lock hash, machine, date) and sets one torch thread: ``local`` runs it in this
  process (``--jobs 1``) or in a ``concurrent.futures.ProcessPoolExecutor`` of ``--jobs``
  spawned workers, handed one job per idle worker, the first ready one in plan order
  (:func:`next_jobs`), so the (task, seed) groups finish in order; ``ray`` submits one Ray
  task per job (``num_cpus=1``), a job's artefacts passed as object references so that Ray
  orders them, on ``ray.init(address=--address)`` or a local instance of ``--jobs`` CPUs. Ray's workers find ``control`` through ``PYTHONPATH`` set
  to this checkout (``runtime_env``), so a cluster needs the checkout at the same path.
- ``ensemble=True`` (``run_suite``; the CLI's ``--ensemble``): after sharding and skipping
  the done runs, the remaining seeds of a ``presa`` / ``cpl`` (task, method) become one job
  (``kind="ensemble"``, :func:`merge_ensembles`, placed after every member's artefacts) trained as one batched ensemble
  (``control.learners.ensemble``), each member with its own run folder, checkpoint and run
  file, equal to its separately trained run up to float rounding.
- ``--shard i/n`` (0 <= i < n) keeps the whole (task, seed) groups ``k`` with ``k % n == i``
  (in ``--tasks`` x ``--seeds`` order): a group's artefacts stay with its runs.
- ``--aggregate`` merges every run file of ``DIR/runs`` into ``DIR/table.json`` and
  ``DIR/table.md`` (:func:`aggregate`): mean ± std over seeds (``llm_safepref.core.stats.mean_std``)
  per (task, method) and averaged over tasks, of the paper's normalisation (``normalized_reward``
  = reward ÷ Oracle's of the same task and seed, both DSRL-normalised first since raw returns
  can be negative; ``normalized_cost`` = cost ÷ max(Task-only's, κ): the paper's ratio where
  Task-only violates the budget, ``C / κ`` where it does not) and DSRL's (``dsrl_normalized_reward``, ``dsrl_normalized_cost``).
  Each row also says whether its runs' validation returns levelled off
  (``control.learners.validation``: the verdict stored in the run file, else read from its
  log): ``undertrained`` is True when some seed's curve did not, False when every seed's did,
  None without validation; ``table.md`` marks the first "undertrained".
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from control.data import SCALES, dataset_path
from control.learners import (ARTEFACTS, ENSEMBLE_METHODS, METHODS, artefact_files, build_command, default_config,
                              get_method, method_names, train, train_artefact, train_ensemble)
from control.learners.validation import read_validation, summarize_validation
from control.tables import write_paper_outputs
from control.tasks import get_spec, task_names
from llm_safepref.core.paths import cache_root
from llm_safepref.core.provenance import run_record, write_json
from llm_safepref.core.stats import mean_std
from llm_safepref.core.tables import format_mean_std, markdown_table

__all__ = ["RUN_FORMAT", "TABLE_FORMAT", "SuiteError", "Job", "SuiteRequest", "plan_jobs", "next_jobs",
           "merge_ensembles", "parse_shard", "shard_jobs", "execute_job", "run_suite", "read_run_file", "aggregate",
           "default_work_dir", "parse_overrides", "TABLE_FIELDS"]

RUN_FORMAT = "control-suite-run-1"
TABLE_FORMAT = "control-suite-table-1"
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The table's per-row fields (each also with ``_std``), then ``n_seeds``.
TABLE_FIELDS = ("normalized_reward", "normalized_cost", "dsrl_normalized_reward", "dsrl_normalized_cost")


class SuiteError(ValueError):
    """Bad suite input (unknown task or method, missing dataset, empty seed list, ...)."""


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One run (``kind="run"``: ``name`` is a method), shared artefact (``"artefact"``: an artefact kind),
    or the runs of several ``seeds`` of one method trained as one batched ensemble (``"ensemble"``)."""

    kind: str
    task: str
    name: str
    seed: int
    deps: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        if self.kind == "ensemble":
            return f"{self.task}__{self.name}__seeds{'-'.join(map(str, self.seeds))}"
        return f"{self.task}__{self.name}__seed{self.seed}"

    def members(self) -> list["Job"]:
        """An ensemble's runs (one per seed); a run or artefact is its own single member."""
        if self.kind != "ensemble":
            return [self]
        return [Job("run", self.task, self.name, s, self.deps) for s in self.seeds]


@dataclass
class SuiteRequest:
    """Everything a job needs besides its identity (picklable, for workers and Ray tasks)."""

    scale: str
    out: str
    work_dir: str
    data_dir: str | None = None
    data_seed: int = 0
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> {field: value}
    command: str | None = None

    def result_path(self, job: Job) -> Path:
        return Path(self.out) / ("runs" if job.kind == "run" else "artefacts") / f"{job.key}.json"

    def job_dir(self, job: Job) -> Path:
        return Path(self.work_dir) / ("runs" if job.kind == "run" else "artefacts") / job.key


def plan_jobs(tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """Jobs in dependency order: per (task, seed) group, its artefacts first, then its runs.

    Artefacts come depth-first in the order the methods first need them, each after the
    artefacts it requires itself, and once per (task, seed) group; a repeated method is one run.
    """
    jobs = []
    methods = list(dict.fromkeys(methods))
    for task in tasks:
        for seed in seeds:
            planned: dict[str, Job] = {}

            def visit(kind: str, path: tuple[str, ...]) -> None:
                if kind in path:
                    raise SuiteError(f"artefact dependency cycle: {' -> '.join((*path, kind))}")
                if kind not in ARTEFACTS:
                    raise SuiteError(f"{path[-1]!r} requires the unknown artefact {kind!r}; valid artefacts: "
                                     f"{', '.join(ARTEFACTS)}")
                if kind in planned:
                    return
                needs = ARTEFACTS[kind].requires
                for dep in needs:
                    visit(dep, (*path, kind))
                planned[kind] = Job("artefact", task, kind, seed, tuple(planned[d].key for d in needs))
                jobs.append(planned[kind])

            for m in methods:
                for a in get_method(m).artefacts:
                    visit(a, (m,))
            for m in methods:
                deps = tuple(planned[a].key for a in get_method(m).artefacts)
                jobs.append(Job("run", task, m, seed, deps))
    return jobs


def drop_unneeded_artefacts(todo: Sequence[Job]) -> list[Job]:
    """``todo`` (dependency order) without the artefacts no pending job needs, directly or through another artefact.

    An artefact whose files are gone from the work folder (another machine, a cleaned cache) but whose
    dependants all have their result files is not retrained: aggregating finished results trains nothing.
    """
    needed: set[str] = set()
    kept: list[Job] = []
    for job in reversed(todo):  # dependants come after what they need
        if job.kind == "artefact" and job.key not in needed:
            continue
        kept.append(job)
        needed.update(job.deps)
    return kept[::-1]


def merge_ensembles(jobs: Sequence[Job]) -> list[Job]:
    """The runs of ``ENSEMBLE_METHODS`` with the same (task, method) as one ``"ensemble"`` job each.

    The ensemble takes the place of its last member, so that every member's artefacts (planned before
    that member's run in its (task, seed) group) come before it; a (task, method) with one seed stays a run.
    """
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        if j.kind == "run" and j.name in ENSEMBLE_METHODS:
            groups.setdefault((j.task, j.name), []).append(j)
    out = []
    for j in jobs:
        group = groups.get((j.task, j.name)) if j.kind == "run" else None
        if not group or len(group) == 1:
            out.append(j)
        elif j is group[-1]:
            deps = tuple(dict.fromkeys(d for m in group for d in m.deps))
            out.append(Job("ensemble", j.task, j.name, group[0].seed, deps, tuple(m.seed for m in group)))
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SuiteError(f"--shard must be i/n with integers, e.g. 0/4; got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise SuiteError(f"--shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def shard_jobs(jobs: Sequence[Job], shard: tuple[int, int] | None) -> list[Job]:
    """The jobs of the whole (task, seed) groups ``k`` with ``k % n == i``, in first-seen group order."""
    if shard is None:
        return list(jobs)
    i, n = shard
    groups: list[tuple[str, int]] = []
    for j in jobs:
        if (j.task, j.seed) not in groups:
            groups.append((j.task, j.seed))
    mine = {g for k, g in enumerate(groups) if k % n == i}
    return [j for j in jobs if (j.task, j.seed) in mine]


def parse_overrides(items: Iterable[str], methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["steps=400", "presa:objective.safety_delta=0.8"]`` -> {method: {field: value}}.

    ``field=value`` applies to every method (and artefact) whose config has that field; at
    least one must. ``method:field=value`` applies to one method or artefact kind.
    """
    out: dict[str, dict[str, str]] = {}
    targets = [*methods, *ARTEFACTS]
    for item in items:
        lhs, eq, value = item.partition("=")
        if not eq or not lhs:
            raise SuiteError(f"--set takes field=value or method:field=value, got {item!r}")
        who, colon, key = lhs.rpartition(":")
        names = [who] if colon else targets
        if colon and who not in targets:
            raise SuiteError(f"--set {item!r}: {who!r} is not a method of this suite nor an artefact; "
                             f"valid: {', '.join(targets)}")
        hit = False
        for name in names:
            cfg = default_config(name, task_names()[0], "smoke")
            if key.split(".")[0] in {f for f in asdict(cfg)}:
                out.setdefault(name, {})[key] = value
                hit = True
        if not hit:
            raise SuiteError(f"--set {item!r}: no config of {', '.join(names)} has a field {key.split('.')[0]!r}")
    return out


def default_work_dir(out: str | os.PathLike) -> Path:
    """``<cache root>/control_suite/<out folder name>-<sha1 of its absolute path, 10 digits>``."""
    path = Path(out).resolve()
    return cache_root() / "control_suite" / f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


# --------------------------------------------------------------------------- result files


def read_run_file(path: str | Path, job: Job | None = None, scale: str | None = None) -> dict:
    """A run file's content, or ``ValueError`` saying why it is not a complete run (of ``job`` at ``scale``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise ValueError(f"no {RUN_FORMAT!r} format field")
    need = ("task", "method", "seed", "scale", "metrics", "config", "data", "command")
    missing = [k for k in need if k not in data]
    if missing:
        raise ValueError(f"missing {missing}")
    metrics = data["metrics"]
    for k in ("eval/normalized_reward", "eval/normalized_cost", "eval/return_mean", "eval/cost_mean"):
        v = metrics.get(k) if isinstance(metrics, dict) else None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"metric {k!r} is {v!r}, expected a finite number")
    if job is not None and (data["task"], data["method"], data["seed"]) != (job.task, job.name, job.seed):
        raise ValueError(f"holds run {(data['task'], data['method'], data['seed'])}, expected "
                         f"{(job.task, job.name, job.seed)}")
    if scale is not None and data["scale"] != scale:
        raise SuiteError(f"{path} is a {data['scale']!r} run and this suite is {scale!r}; use another --out")
    return data


def _artefact_done(req: SuiteRequest, job: Job) -> bool:
    """Its record reads as this artefact's and every file the artefact declares is in its folder."""
    try:
        record = json.loads(req.result_path(job).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(record, dict) or (record.get("kind"), record.get("task"), record.get("seed")) != \
            (job.name, job.task, job.seed):
        return False
    folder = req.job_dir(job)
    return all((folder / name).exists() for name in artefact_files(job.name))


def _is_done(req: SuiteRequest, job: Job, say: Callable[[str], None]) -> bool:
    path = req.result_path(job)
    if job.kind == "artefact":
        return _artefact_done(req, job)
    if not path.exists():
        return False
    try:
        read_run_file(path, job, req.scale)
        return True
    except SuiteError:
        raise
    except ValueError as e:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        say(f"corrupted run file {path} ({e}); moved to {aside.name}, redoing the run")
        return False


# --------------------------------------------------------------------------- one job


def execute_job(job: Job, req: SuiteRequest, *_deps: Any) -> dict[str, Any]:
    """Run one job and write its result file; the same function on every backend.

    ``_deps`` are the results of the jobs it depends on (Ray passes them to order the tasks).
    Returns a short summary ``{"key", "kind", "seconds", "metrics", "resumed_from"}``.
    """
    import torch

    torch.set_num_threads(1)
    say = lambda s: print(f"[{job.key}] {s}", flush=True)  # noqa: E731
    over = req.overrides.get(job.name, {})
    if job.kind == "ensemble":
        members = job.members()
        spec = get_method(job.name)
        arts = [{kind: str(req.job_dir(Job("artefact", job.task, kind, m.seed))) for kind in spec.artefacts}
                for m in members]
        recs = train_ensemble(job.task, job.name, list(job.seeds), req.scale, [req.job_dir(m) for m in members],
                              data_dir=req.data_dir, data_seed=req.data_seed, overrides=over, artefacts=arts,
                              log=say)
        for m, res in zip(members, recs):
            write_json(req.result_path(m), {"format": RUN_FORMAT, **run_record(command=req.command), **res,
                                            "work_dir": str(req.job_dir(m))})
        mean = lambda k: sum(r["metrics"][k] for r in recs) / len(recs)  # noqa: E731
        return {"key": job.key, "kind": job.kind, "seconds": recs[0]["train"]["ensemble"]["train_seconds"],
                "metrics": {k: mean(k) for k in ("eval/normalized_reward", "eval/normalized_cost")},
                "resumed_from": recs[0]["train"]["resumed_from"]}
    spec = ARTEFACTS[job.name] if job.kind == "artefact" else get_method(job.name)
    artefacts = {kind: str(req.job_dir(Job("artefact", job.task, kind, job.seed))) for kind in spec.artefacts}
    if job.kind == "artefact":
        res = train_artefact(job.name, job.task, job.seed, req.scale, req.job_dir(job), data_dir=req.data_dir,
                             data_seed=req.data_seed, artefacts=artefacts, overrides=over, log=say)
    else:
        res = train(job.task, job.name, job.seed, req.scale, req.job_dir(job), data_dir=req.data_dir,
                    data_seed=req.data_seed, artefacts=artefacts, overrides=over, log=say)
    record = {"format": RUN_FORMAT, **run_record(command=req.command), **res,
              "work_dir": str(req.job_dir(job))}
    write_json(req.result_path(job), record)
    return {"key": job.key, "kind": job.kind, "seconds": res["seconds"], "metrics": res["metrics"],
            "resumed_from": res["train"]["resumed_from"]}


# --------------------------------------------------------------------------- backends


def _summary_line(done: int, total: int, s: dict) -> str:
    m = s["metrics"]
    if s["kind"] == "artefact":
        what = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("heldout/") and v is not None) or \
            ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k == "loss/bc")  # the BC warm-up: its last loss
    else:
        what = f"normalized reward {m['eval/normalized_reward']:.3f}, normalized cost {m['eval/normalized_cost']:.3f}"
    resumed = f", resumed from step {s['resumed_from']}" if s.get("resumed_from") is not None else ""
    return f"[{done}/{total}] {s['key']}: {what} ({s['seconds']:.1f} s{resumed})"


def next_jobs(pending: Sequence[Job], done: set[str], failed: Sequence[str], keys: set[str],
              free: int) -> tuple[list[Job], list[Job]]:
    """``(to submit, to skip)``: the first ``free`` pending jobs, in plan order, whose dependencies
    (those in ``keys``, i.e. planned in this call) are all done, and every job with a failed one.

    Only as many jobs as there are idle workers are handed to the pool: a job queued inside the
    pool would hold its place ahead of a later-ready job of an earlier (task, seed) group, so a
    group's artefact-dependent runs would wait for every other group's independent ones, and a
    stopped run would leave every group unfinished instead of the last one.
    """
    submit, skipped = [], []
    for job in pending:
        deps = [d for d in job.deps if d in keys]
        if any(d in failed for d in deps):
            skipped.append(job)
        elif len(submit) < free and all(d in done for d in deps):
            submit.append(job)
    return submit, skipped


def _run_local(jobs: list[Job], req: SuiteRequest, n_workers: int, say) -> list[str]:
    failed: list[str] = []
    keys = {j.key for j in jobs}
    if n_workers <= 1:
        for k, job in enumerate(jobs, 1):
            if any(d in failed for d in job.deps):
                failed.append(job.key)
                say(f"[{k}/{len(jobs)}] {job.key}: skipped, its artefact failed")
                continue
            try:
                say(_summary_line(k, len(jobs), execute_job(job, req)))
            except Exception:  # a failed run does not stop the others
                failed.append(job.key)
                say(f"[{k}/{len(jobs)}] {job.key} FAILED:\n{traceback.format_exc()}")
        return failed
    pending, running, done = list(jobs), {}, set()
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            submit, skipped = next_jobs(pending, done, failed, keys, n_workers - len(running))
            for job in skipped:
                pending.remove(job)
                failed.append(job.key)
                say(f"{job.key}: skipped, its artefact failed")
            for job in submit:
                pending.remove(job)
                running[pool.submit(execute_job, job, req)] = job
            if not running:
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    summary = fut.result()
                    done.add(job.key)
                    say(_summary_line(len(done) + len(failed), len(jobs), summary))
                except Exception as e:
                    failed.append(job.key)
                    say(f"{job.key} FAILED: {type(e).__name__}: {e}")
    return failed


def _run_ray(jobs: list[Job], req: SuiteRequest, n_workers: int, address: str | None, say) -> list[str]:
    import ray

    started = not ray.is_initialized()
    if started:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                                  "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = max(1, n_workers)
        ray.init(**kwargs)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(execute_job)
        refs: dict[str, Any] = {}
        for job in jobs:  # dependency order: artefacts were planned first
            refs[job.key] = remote.remote(job, req, *[refs[d] for d in job.deps if d in refs])
        by_ref = {ref: key for key, ref in refs.items()}
        left, failed, n_done = list(refs.values()), [], 0
        while left:
            ready, left = ray.wait(left, num_returns=1)
            key = by_ref[ready[0]]
            try:
                summary = ray.get(ready[0])
                n_done += 1
                say(_summary_line(n_done + len(failed), len(jobs), summary))
            except Exception as e:  # RayTaskError (a dependent of a failed artefact fails too)
                failed.append(key)
                say(f"{key} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return failed
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- the suite


def _check_request(tasks, methods, seeds, scale) -> None:
    bad = [t for t in tasks if t not in task_names()]
    if bad:
        raise SuiteError(f"unknown task(s) {', '.join(bad)}; valid tasks: {', '.join(task_names())}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SuiteError(f"unknown method(s) {', '.join(bad)}; valid methods: {', '.join(method_names())}")
    if not tasks or not methods:
        raise SuiteError("empty task or method list: give at least one --tasks and one --methods")
    if not seeds:
        raise SuiteError("empty seed list: give at least one seed, e.g. --seeds 0 1 2")
    if len(set(seeds)) != len(seeds):
        raise SuiteError(f"repeated seeds in {list(seeds)}")
    if scale not in SCALES:
        raise SuiteError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")


def run_suite(tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], scale: str, out: str | Path, *,
              backend: str = "local", jobs: int = 1, shard: str | None = None, do_aggregate: bool = False,
              address: str | None = None, data_dir: str | None = None, data_seed: int = 0,
              work_dir: str | Path | None = None, overrides: Sequence[str] = (), command: str | None = None,
              ensemble: bool = False, say: Callable[[str], None] | None = None) -> int:
    """Run the suite (module docstring); returns 0, or 1 when some run failed. Bad input raises ``SuiteError``."""
    say = say or (lambda s: print(s, flush=True))
    _check_request(tasks, methods, seeds, scale)
    if backend not in ("local", "ray"):
        raise SuiteError(f"unknown backend {backend!r}; valid backends: local, ray")
    if jobs < 1:
        raise SuiteError(f"--jobs must be >= 1, got {jobs}")
    req = SuiteRequest(scale=scale, out=str(out), work_dir=str(work_dir or default_work_dir(out)), data_dir=data_dir,
                       data_seed=data_seed, overrides=parse_overrides(overrides, methods), command=command)
    planned = shard_jobs(plan_jobs(tasks, methods, seeds), parse_shard(shard))
    not_done = [j for j in planned if not _is_done(req, j, say)]
    todo = drop_unneeded_artefacts(not_done)
    kept = {j.key for j in todo}
    unneeded = [j.key for j in not_done if j.key not in kept]
    missing = sorted({j.task for j in todo if not dataset_path(j.task, scale, data_seed, data_dir).exists()})
    if missing:
        raise SuiteError(f"no {scale} dataset for task(s) {', '.join(missing)} (seed {data_seed}); build with: "
                         f"{build_command(' '.join(missing), scale, data_seed, data_dir)}")
    say(f"suite: {len(planned)} jobs ({len(planned) - len(todo) - len(unneeded)} done already"
        + (f", {len(unneeded)} artefact(s) not needed: every run that reads them is done" if unneeded else "")
        + f"), backend {backend}, {jobs} worker(s); results {out}, checkpoints {req.work_dir}")
    if ensemble:
        merged = merge_ensembles(todo)
        for j in merged:
            if j.kind == "ensemble":
                say(f"suite: {j.key}: seeds {', '.join(map(str, j.seeds))} of {j.name} as one batched ensemble")
        todo = merged
    t0 = time.time()
    failed: list[str] = []
    if todo:
        failed = (_run_ray(todo, req, jobs, address, say) if backend == "ray" else _run_local(todo, req, jobs, say))
    say(f"suite: {len(todo) - len(failed)} of {len(todo)} jobs ran in {time.time() - t0:.1f} s"
        + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if do_aggregate:
        table = aggregate(out, command=command, say=say)
        say(f"wrote {Path(out) / 'table.json'} and table.md ({len(table['rows'])} rows)")
    return 1 if failed else 0


# --------------------------------------------------------------------------- aggregate


def _levelled_off(record: dict) -> bool | None:
    """A run's verdict: its run file's ``validation``, else computed from its log when that is here."""
    v = record.get("validation")
    if isinstance(v, dict) and "levelled_off" in v:
        return v["levelled_off"]
    log = (record.get("train") or {}).get("log")
    if log and Path(log).exists():
        return summarize_validation(read_validation(log))["levelled_off"]
    return None


def _ratio(x: float | None, ref: float | None) -> float | None:
    if x is None or ref is None or ref <= 1e-12:
        return None
    return x / ref


#: The config fields that count a learner's steps (all phases, then each phase that has its own field).
STEP_FIELDS = ("steps", "bc_warmup_steps", "stage1_steps", "policy_steps")


def learner_steps(records: Iterable[dict], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, its step fields from its runs' configs (one value each, or the sorted distinct values when tasks
    differ)."""
    seen: dict[str, dict[str, set]] = {}
    for r in records:
        cfg = r.get("config") or {}
        mine = seen.setdefault(r["method"], {})
        for f in STEP_FIELDS:
            if isinstance(cfg.get(f), int) and not (f == "stage1_steps" and cfg.get("shared_encoder")):
                mine.setdefault(f, set()).add(cfg[f])
    return {m: {f: (next(iter(v)) if len(v) == 1 else sorted(v)) for f, v in seen[m].items()}
            for m in methods if m in seen}


def _steps_text(s: dict[str, Any]) -> str:
    rest = ", ".join(f"{k} {v}" for k, v in s.items() if k != "steps")
    return f"{s.get('steps')}" + (f" ({rest})" if rest else "")


def data_builds(runs) -> dict[str, list[dict]]:
    """Per task, the distinct behaviour-data builds its runs trained on (``created_utc``, revision, seeds).

    A build is not bit-reproducible across machines (the SAC behaviour policies' float arithmetic
    differs with the CPU's kernels, and chaos does the rest), so a rebuild on a fresh machine is
    another dataset of the same seed; the table says when a task's seeds saw more than one.
    """
    out: dict[str, dict[tuple, dict]] = {}
    for r in runs:
        d = r.get("data") or {}
        key = (d.get("created_utc"), d.get("git_revision"))
        entry = out.setdefault(r["task"], {}).setdefault(
            key, {"created_utc": key[0], "git_revision": key[1], "seeds": set(), "n_runs": 0})
        entry["seeds"].add(r["seed"])
        entry["n_runs"] += 1
    return {task: [{**e, "seeds": sorted(e["seeds"])} for _, e in sorted(builds.items(), key=lambda kv: str(kv[0]))]
            for task, builds in out.items()}


def _data_builds_text(builds: dict[str, list[dict]]) -> str:
    multi = {t: b for t, b in builds.items() if len(b) > 1}
    if not multi:
        return "\nData: every task's runs trained on one behaviour-data build.\n"
    parts = [f"{t}: " + "; ".join(f"build {e['created_utc']} (seeds {', '.join(map(str, e['seeds']))}, "
                                  f"{e['n_runs']} runs)" for e in b) for t, b in multi.items()]
    return ("\nData: some tasks' runs trained on more than one build of the same data seed (a rebuild on a fresh "
            "machine is not bit-identical; the std over seeds then includes the data's variation): "
            + " | ".join(parts) + ".\n")


def aggregate(out: str | Path, *, command: str | None = None, say: Callable[[str], None] | None = None) -> dict:
    """Merge ``out/runs/*.json`` into ``out/table.json`` and ``out/table.md``; returns the table.

    Per run: ``dsrl_normalized_reward`` / ``dsrl_normalized_cost`` are its ``eval/normalized_*``
    (DSRL, mean over the held-out goals); ``normalized_reward`` = its DSRL reward ÷ the Oracle's
    of the same (task, seed) (None without an Oracle run or when the Oracle's is <= 0);
    ``normalized_cost`` = its mean episode cost ÷ max(Task-only's of the same (task, seed), κ): the
    paper's ratio where Task-only violates the budget κ, ``C / κ`` where Task-only is safe. Rows: mean ± std over seeds per (task, method) and, per method,
    ``task = "average"``: per seed the mean over its tasks, then mean ± std over the seeds.
    """
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out)
    runs = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            runs.append(read_run_file(path))
        except ValueError as e:
            say(f"aggregate: skipped corrupted run file {path} ({e})")
    scales = sorted({r["scale"] for r in runs})
    if len(scales) > 1:
        raise SuiteError(f"{out / 'runs'} mixes scales {scales}; aggregate one scale per folder")
    by = {(r["task"], r["method"], r["seed"]): r for r in runs}

    def per_run(r: dict) -> dict[str, float | None]:
        m = r["metrics"]
        oracle, task_only = by.get((r["task"], "oracle", r["seed"])), by.get((r["task"], "task_only", r["seed"]))
        ref_c = None if task_only is None else task_only["metrics"]["eval/cost_mean"]
        return {
            "normalized_reward": _ratio(m["eval/normalized_reward"],
                                        None if oracle is None else oracle["metrics"]["eval/normalized_reward"]),
            # The paper's cost / Task-only's, with Task-only's floored at the budget kappa: the paper's
            # ratio wherever Task-only violates the budget (its premise: Task-only is the unsafe
            # reference), C / kappa where Task-only is itself safe (there a ratio to a small or zero
            # cost would rank safe methods by noise, or call a safe method as unsafe as Task-only).
            "normalized_cost": None if ref_c is None else _ratio(m["eval/cost_mean"],
                                                                 max(ref_c, get_spec(r["task"]).cost_threshold)),
            "dsrl_normalized_reward": m["eval/normalized_reward"],
            "dsrl_normalized_cost": m["eval/normalized_cost"],
        }

    values = {key: per_run(r) for key, r in by.items()}
    task_order = [t for t in task_names() if any(k[0] == t for k in by)]
    method_order = [m for m in METHODS if any(k[1] == m for k in by)]
    rows = []

    verdicts = {key: _levelled_off(r) for key, r in by.items()}

    def undertrained(keys) -> dict[str, Any]:
        v = [verdicts[k] for k in keys if verdicts[k] is not None]
        return {"undertrained": None if not v else not all(v), "n_not_levelled": sum(not x for x in v),
                "n_validated": len(v)}

    def row(task: str, method: str, per_seed: dict[int, dict[str, float | None]]) -> dict:
        out_row: dict[str, Any] = {"task": task, "method": method}
        for f in TABLE_FIELDS:
            ms = mean_std([v[f] for v in per_seed.values() if v[f] is not None])
            out_row[f] = None if ms["n"] == 0 else ms["mean"]
            out_row[f + "_std"] = None if ms["n"] == 0 else ms["std"]
        out_row["n_seeds"] = len(per_seed)
        return out_row

    for method in method_order:
        for task in task_order:
            per_seed = {k[2]: v for k, v in values.items() if k[0] == task and k[1] == method}
            if per_seed:
                rows.append({**row(task, method, per_seed),
                             **undertrained([k for k in by if k[0] == task and k[1] == method])})
        seeds = sorted({k[2] for k in values if k[1] == method})
        averaged = {}
        for seed in seeds:
            mine = [v for k, v in values.items() if k[1] == method and k[2] == seed]
            averaged[seed] = {f: (float(sum(x[f] for x in mine if x[f] is not None) /
                                        len([x for x in mine if x[f] is not None]))
                                  if any(x[f] is not None for x in mine) else None) for f in TABLE_FIELDS}
        rows.append({**row("average", method, averaged),
                     "n_tasks": len({k[0] for k in values if k[1] == method}),
                     **undertrained([k for k in by if k[1] == method])})
    table = {"format": TABLE_FORMAT, **run_record(command=command), "scale": scales[0] if scales else None,
             "tasks": task_order, "methods": method_order, "seeds": sorted({k[2] for k in by}),
             "runs": sorted(f"{t}__{m}__seed{s}.json" for t, m, s in by), "rows": rows,
             "normalisation": {
                 "normalized_reward": "DSRL-normalised reward / Oracle's of the same task and seed",
                 "normalized_cost": "episode cost / max(Task-only's of the same task and seed, kappa): the paper's "
                                    "cost / Task-only's where Task-only violates the budget kappa, C / kappa where "
                                    "Task-only is safe",
                 "dsrl_normalized_reward": "(R - R_min) / (R_max - R_min), references from the dataset's episodes",
                 "dsrl_normalized_cost": "C / kappa"},
             "validation_criterion": summarize_validation([])["criterion"]}
    table["learner_steps"] = learner_steps(by.values(), method_order)
    table["data_builds"] = data_builds(by.values())
    # The views (methods -> name -> tasks / average), the paper's row, presa_table.json, the plots.
    table["method_order"] = method_order
    paper_md = write_paper_outputs(out, table, rows, by, command=table["command"])
    write_json(out / "table.json", table)
    headers = ["task", "method", "normalized reward", "normalized cost", "DSRL reward", "DSRL cost", "seeds",
               "validation"]

    def verdict(r: dict) -> str:
        if r["undertrained"] is None:
            return "—"
        return (f"undertrained ({r['n_not_levelled']}/{r['n_validated']} not levelled off)" if r["undertrained"]
                else "levelled off")

    md_rows = [[r["task"], r["method"], *(format_mean_std(r[f], r[f + "_std"]) for f in TABLE_FIELDS), r["n_seeds"],
                verdict(r)] for r in rows]
    md = (f"# Control suite ({table['scale']})\n\n"
          f"Mean ± std over seeds; normalized reward = reward ÷ Oracle's, normalized cost = cost ÷ max(Task-only's, κ) "
          f"(paper form where Task-only is unsafe, C/κ where it is safe); DSRL: (R − R_min)/(R_max − R_min) and C/κ.\n\n"
          + markdown_table(headers, md_rows, align=["l", "l", "r", "r", "r", "r", "r", "l"])
          + "\n" + paper_md
          + "\nSteps per learner (every phase; from the runs' configs): "
          + "; ".join(f"{m} {_steps_text(s)}" for m, s in table["learner_steps"].items()) + ".\n"
          + _data_builds_text(table["data_builds"])
          + f"\nValidation: {table['validation_criterion']} (`control/learners/validation.py`)."
          + f"\n\nCommand: `{table['command']}`  \nRevision {table['git_revision']}, {table['machine']}, "
            f"{table['date']}.\n")
    tmp = out / "table.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "table.md")
    return table
