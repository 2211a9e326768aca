"""Where a PRESA training step's time goes on CPU, for the default run (``make train``).

    python benchmarks/profile_presa_step.py                       # 2 threads, 2 warm-up + 6 timed steps
    python benchmarks/profile_presa_step.py --steps 10 --threads 2 --out results/presa_step_profile.json

Builds the trainer exactly as ``recipes/presa_lora.py`` does (``llm_safepref.recipes.RecipeRun``
with the recipe's defaults file: embedded model, embedded data, LoRA r=16, batch 4, max_length
160), runs a few optimiser steps and times each phase of every step:

* ``collate``: the data collator (tokenised rows -> padded ``(2B, T)`` tensors);
* ``policy_forward``: the policy forward with gradients over ``[chosen; rejected]`` (what is left
  of the loss computation once the parts below are taken out);
* ``reference_forward``: the no-grad reference forward (the same model with the adapter off);
* ``pair_loss``: CPL + the safety-label term + the Lagrangian (``compute_pair_loss``);
* ``metrics``: the logged DPO-style metrics (``_pair_metrics`` + ``_record``);
* ``backward``: ``accelerator.backward``;
* ``optimizer``: ``on_pre_optimizer_step`` -> ``on_optimizer_step`` (clipping, AdamW, the scheduler);
* ``other``: the rest of the step's wall time (callbacks, ν's update, logging, the loop).

and the shape of every batch: padded length ``T``, the real (non-pad) tokens, the completion
tokens, hence the padding fraction: the upper bound of what length grouping could save.

Design decisions:

* Wrapping the trainer's own methods with wall-clock timers (``time.perf_counter``), not
  ``torch.profiler``: the profiler's per-op overhead on CPU distorts a step of a 135M model, and
  the question is which *phase* to attack, not which kernel.
* Warm-up steps are excluded (first-call allocations, lazy inits); the figures are medians over
  the timed steps, with min and max, and each phase's share of the median step.
* Threads fixed (``OMP_NUM_THREADS`` before torch is imported, then ``torch.set_num_threads``),
  as ``make train`` runs (``accelerate launch --num_cpu_threads_per_process 2``). The machine's
  load (``/proc/loadavg``, as ``uptime`` prints it) is recorded at the start and the end: on a
  shared machine the absolute times move with it; the shares move much less.
* ``OMP_WAIT_POLICY`` is recorded: on a machine whose cores other jobs share, OpenMP threads
  that spin while they wait for a descheduled sibling make every parallel region wait (a 2-thread
  evaluation ran 20x slower that way on 2026-12-01); ``PASSIVE`` changes how threads wait, never
  how work is split, so the trained numbers (``train_log``) are the same.
* Nothing is saved (``save_strategy no``, a temporary output folder); the results file carries the
  run record of :mod:`llm_safepref.core.provenance` (command, git revision, versions, machine, date).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

PHASES = ("collate", "policy_forward", "reference_forward", "pair_loss", "metrics", "backward", "optimizer", "other")


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def _uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return _load()


class _Timer:
    """Accumulates seconds per phase for the current step."""

    def __init__(self):
        self.current: dict[str, float] = {}

    def wrap(self, owner, name: str, phase: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def profile(steps: int, warmup: int, threads: int, extra: list[str]) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(threads)
    from llm_safepref.recipes import RecipeRun
    from recipes.presa_lora import RECIPE

    out = tempfile.mkdtemp(prefix="presa_profile_")
    argv = ["--output_dir", out, "--max_steps", str(warmup + steps), "--save_strategy", "no", "--skip_eval", "true",
            "--logging_steps", "1", *extra]
    run = RecipeRun.parse(RECIPE, argv)
    run.prepare()
    run.build()
    trainer = run.trainer
    timer = _Timer()
    shapes: list[dict] = []

    collator = trainer.data_collator
    original_collate = collator.__call__

    class TimedCollator:  # the trainer's collator, timed, and the shape of what it returns
        def __call__(self, examples):
            start = time.perf_counter()
            batch = original_collate(examples)
            timer.current["collate"] = timer.current.get("collate", 0.0) + time.perf_counter() - start
            ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]  # (2B, T) each
            shapes.append({"rows": int(ids.shape[0]), "padded_length": int(ids.shape[1]),
                           "tokens": int(attn.sum()), "completion_tokens": int(comp.sum()),
                           "padded_cells": int(ids.numel())})
            return batch

        def __getattr__(self, name):
            return getattr(collator, name)

    trainer.data_collator = TimedCollator()
    timer.wrap(trainer, "_compute_loss", "loss_total")
    timer.wrap(trainer, "_reference_logps", "reference_forward")
    timer.wrap(trainer, "compute_pair_loss", "pair_loss")
    timer.wrap(trainer, "_pair_metrics", "metrics")
    timer.wrap(trainer, "_record", "metrics")
    timer.wrap(trainer.accelerator, "backward", "backward")

    records: list[dict] = []

    class StepClock(TrainerCallback):
        def __init__(self):
            self.last_end = None
            self.pre_opt = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_end = time.perf_counter()
            timer.current = {}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.pre_opt = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            timer.current["optimizer"] = time.perf_counter() - self.pre_opt

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            phases = dict(timer.current)
            total = phases.pop("loss_total", 0.0)
            phases["policy_forward"] = total - sum(phases.get(k, 0.0) for k in
                                                   ("reference_forward", "pair_loss", "metrics"))
            step = now - self.last_end  # from the previous step's end: the batch fetch and collation included
            phases["other"] = step - sum(phases.get(k, 0.0) for k in PHASES if k != "other")
            records.append({"step": state.global_step, "seconds": step,
                            **{k: phases.get(k, 0.0) for k in PHASES}})
            self.last_end, timer.current = now, {}

    trainer.add_callback(StepClock())
    load_start, uptime_start = _load(), _uptime()
    trainer.train()
    load_end, uptime_end = _load(), _uptime()
    timed = records[warmup:]
    batches = shapes[warmup: warmup + len(timed)] if len(shapes) >= warmup + len(timed) else shapes[-len(timed):]

    def summary(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                "max": round(max(values), 4)}

    step_median = statistics.median(r["seconds"] for r in timed)
    phases = {}
    for k in PHASES:
        s = summary([r[k] for r in timed])
        s["share_of_median_step"] = round(s["median"] / step_median, 4)
        phases[k] = s
    padded = sum(b["padded_cells"] for b in batches)
    real = sum(b["tokens"] for b in batches)
    return {
        "steps_timed": len(timed), "warmup_steps": warmup, "threads": threads, "torch_threads": torch.get_num_threads(),
        "step_seconds": summary([r["seconds"] for r in timed]),
        "phases": phases,
        "batches": {"rows_per_batch": batches[0]["rows"] if batches else None,
                    "padded_length": summary([float(b["padded_length"]) for b in batches]),
                    "real_tokens_per_batch": summary([float(b["tokens"]) for b in batches]),
                    "completion_tokens_per_batch": summary([float(b["completion_tokens"]) for b in batches]),
                    "padding_fraction": round(1 - real / padded, 4) if padded else None},
        "per_step": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in records],
        # What was trained: the same numbers whatever the timing (a check that a speed setting changed nothing).
        "train_log": [{k: e[k] for k in ("step", "loss", "grad_norm", "lagrange/nu") if k in e}
                      for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_start": load_start, "load_end": load_end, "uptime_start": uptime_start, "uptime_end": uptime_end,
        "recipe_args": argv,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and left out")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (make train: 2 on this machine)")
    parser.add_argument("--out", default=str(ROOT / "results" / "presa_step_profile.json"))
    parser.add_argument("recipe_args", nargs="*", help="extra recipe flags after --, e.g. -- --max_length 128")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from llm_safepref.core.provenance import run_record, write_json

    result = profile(args.steps, args.warmup, args.threads, args.recipe_args)
    write_json(args.out, run_record(**result))
    p = result["phases"]
    print(f"step {result['step_seconds']['median']:.2f} s (median of {result['steps_timed']}; "
          f"load {result['load_start']} -> {result['load_end']})")
    for k in PHASES:
        print(f"  {k:18s} {p[k]['median']:7.3f} s  {100 * p[k]['share_of_median_step']:5.1f} %")
    b = result["batches"]
    print(f"  batches: {b['rows_per_batch']} rows, padded length {b['padded_length']['median']}, "
          f"padding {100 * (b['padding_fraction'] or 0):.1f} % of cells")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
