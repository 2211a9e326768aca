"""The seeds of a PRESA / CPL-only run as one batched ensemble equal the separately trained runs.

* Member for member (same seeds, hence the same minibatches), the ensemble's policy and reference
  weights, Adam state, multiplier and per-step metrics equal separately trained ``PresaLearner`` s to
  1e-5, across the end of the BC warm-up.
* ``run_ensemble`` writes each member's ordinary log and checkpoint; a member checkpointed earlier
  than the others catches up alone, and the result still equals the separate runs.
* ``train_ensemble`` gives the records ``train`` gives; the suite's ``ensemble`` option groups the
  seeds of presa / cpl into one job and writes the same run files.
* Bad input: mixed configs, repeated seeds, a method that cannot ensemble.
"""

import json

import numpy as np
import pytest
import torch

from control.learners import default_config, train, train_ensemble
from control.learners.base import run_learner
from control.learners.cpl import CplLearner
from control.learners.ensemble import PresaEnsemble, run_ensemble
from control.learners.presa import PresaLearner
from control.suite import Job, merge_ensembles, plan_jobs, read_run_file, run_suite
from llm_safepref.core.schema import Metric

pytestmark = pytest.mark.control
SEEDS = (0, 1, 2)
CLASSES = {"presa": PresaLearner, "cpl": CplLearner}


def _cfg(method, **over):
    return default_config(method, "run", "smoke", {"steps": "24", "bc_warmup_steps": "8", "log_every": "4",
                                                   "checkpoint_every": "4", **over})


def _assert_same_learner(a, b, atol=1e-5):
    for name in ("policy", "reference"):
        for k, v in a.modules[name].state_dict().items():
            torch.testing.assert_close(b.modules[name].state_dict()[k], v, rtol=1e-5, atol=atol)
    sa, sb = a.optimizers["policy"].state_dict()["state"], b.optimizers["policy"].state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert float(sa[i]["step"]) == float(sb[i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=1e-4, atol=atol)
    assert a.rng.bit_generator.state == b.rng.bit_generator.state  # the same minibatches were drawn
    if a.multiplier is not None:
        assert b.multiplier.value == pytest.approx(a.multiplier.value, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", ["presa", "cpl"])
def test_ensemble_members_equal_separately_trained_models(method, smoke_dataset):
    ds = smoke_dataset("run")
    cfg = _cfg(method)
    cls = CLASSES[method]
    separate = [cls(cfg, ds, s) for s in SEEDS]
    sep_metrics = [[ln.train_step(step) for step in range(cfg.steps)] for ln in separate]
    members = [cls(cfg, ds, s) for s in SEEDS]
    ens = PresaEnsemble(members)
    ens_metrics = [ens.train_step(step) for step in range(cfg.steps)]
    ens.sync()
    for m, (a, b) in enumerate(zip(separate, members)):
        _assert_same_learner(a, b)
        for step in range(cfg.steps):
            want, got = sep_metrics[m][step], ens_metrics[step][m]
            assert want.keys() == got.keys(), step
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5), (step, k)
    # The members really differ (their own seeds, initialisations and minibatches).
    w = [ln.pi.net[0].weight for ln in members]
    assert not torch.allclose(w[0], w[1])
    if method == "presa":
        assert Metric.NU in ens_metrics[-1][0] and len({round(ln.multiplier.value, 9) for ln in members}) == 3


def test_run_ensemble_writes_member_runs_and_catches_up_a_lagging_member(smoke_dataset, tmp_path):
    ds = smoke_dataset("run")
    cfg = _cfg("presa")
    refs = [PresaLearner(cfg, ds, s) for s in SEEDS]
    for s, ln in zip(SEEDS, refs):
        run_learner(ln, tmp_path / f"ref{s}")
    # Member 1 was checkpointed at step 12 before the ensemble starts (e.g. a kill between writes).
    partial = PresaLearner(_cfg("presa", steps="12"), ds, 1)
    run_learner(partial, tmp_path / "ens1")
    ckpt = torch.load(tmp_path / "ens1" / "checkpoint.pt", weights_only=False)
    ckpt["config"] = json.loads(json.dumps(torch.load(tmp_path / "ref1" / "checkpoint.pt",
                                                      weights_only=False)["config"]))
    torch.save(ckpt, tmp_path / "ens1" / "checkpoint.pt")  # the same run's config, at step 12
    members = [PresaLearner(cfg, ds, s) for s in SEEDS]
    results = run_ensemble(members, [tmp_path / f"ens{s}" for s in SEEDS])
    assert [r["resumed_from"] for r in results] == [None, 12, None]
    for s, ref, mem, res in zip(SEEDS, refs, members, results):
        _assert_same_learner(ref, mem)
        saved = torch.load(res["checkpoint"], weights_only=False)
        assert saved["step"] == cfg.steps and saved["method"] == "presa"
        rows = [r for r in map(json.loads, open(res["log"]).read().splitlines()) if "event" not in r]
        ref_rows = [json.loads(x) for x in (tmp_path / f"ref{s}" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(4, 25, 4))
        for r, q in zip(rows, ref_rows):
            assert r.keys() == q.keys()
            for k in r:
                assert r[k] == pytest.approx(q[k], rel=1e-5, abs=1e-5)
    # A finished ensemble resumes at its end: nothing retrained.
    again = run_ensemble([PresaLearner(cfg, ds, s) for s in SEEDS], [tmp_path / f"ens{s}" for s in SEEDS])
    assert [r["resumed_from"] for r in again] == [24, 24, 24]


def test_train_ensemble_records_match_train(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("run")
    over = {"steps": "20", "bc_warmup_steps": "6"}
    recs = train_ensemble("run", "cpl", [3, 4], "smoke", [tmp_path / "a", tmp_path / "b"],
                          data_dir=str(control_data_dir), overrides=over)
    for seed, rec in zip((3, 4), recs):
        one = train("run", "cpl", seed, "smoke", tmp_path / f"one{seed}", data_dir=str(control_data_dir),
                    overrides=over)
        assert rec["seed"] == seed and rec["config"] == one["config"]
        assert rec["train"]["ensemble"]["seeds"] == [3, 4]
        for k, v in one["metrics"].items():
            assert rec["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k
    with pytest.raises(ValueError, match="cannot train as an ensemble; ensemble methods: presa, cpl"):
        train_ensemble("run", "task_only", [0, 1], "smoke", [tmp_path / "x", tmp_path / "y"],
                       data_dir=str(control_data_dir))


def test_bad_ensembles_are_refused(smoke_dataset):
    ds = smoke_dataset("run")
    with pytest.raises(ValueError, match="share one learner class, config and dataset"):
        PresaEnsemble([PresaLearner(_cfg("presa"), ds, 0), PresaLearner(_cfg("presa", steps="30"), ds, 1)])
    with pytest.raises(ValueError, match="repeated seeds"):
        PresaEnsemble([PresaLearner(_cfg("presa"), ds, 0), PresaLearner(_cfg("presa"), ds, 0)])


def test_the_suite_trains_presa_seeds_as_one_ensemble_job(smoke_dataset, control_data_dir, tmp_path):
    smoke_dataset("run")
    jobs = plan_jobs(["run"], ["presa", "task_only"], [0, 1, 2])
    merged = merge_ensembles(jobs)
    kinds = [(j.kind, j.name, j.seeds) for j in merged]
    assert ("ensemble", "presa", (0, 1, 2)) in kinds and sum(k == "run" for k, _, _ in kinds) == 3
    assert merge_ensembles([Job("run", "run", "presa", 1)]) == [Job("run", "run", "presa", 1)]  # one seed: a run
    out, work = tmp_path / "out", tmp_path / "work"
    code = run_suite(["run"], ["presa"], [0, 1], "smoke", out, work_dir=work, data_dir=str(control_data_dir),
                     ensemble=True, command="pytest", say=lambda s: None)
    assert code == 0
    ref_out = tmp_path / "ref"
    assert run_suite(["run"], ["presa"], [0, 1], "smoke", ref_out, work_dir=tmp_path / "wref",
                     data_dir=str(control_data_dir), command="pytest", say=lambda s: None) == 0
    for seed in (0, 1):
        rec = read_run_file(out / "runs" / f"run__presa__seed{seed}.json")
        ref = read_run_file(ref_out / "runs" / f"run__presa__seed{seed}.json")
        assert rec["train"]["ensemble"]["seeds"] == [0, 1] and "ensemble" not in ref["train"]
        assert rec["work_dir"] == str(work / "runs" / f"run__presa__seed{seed}")
        np.testing.assert_allclose(rec["metrics"]["eval/normalized_reward"], ref["metrics"]["eval/normalized_reward"],
                                   rtol=1e-4, atol=1e-4)
    # Done runs are skipped: the next call plans no ensemble.
    said = []
    assert run_suite(["run"], ["presa"], [0, 1], "smoke", out, work_dir=work, data_dir=str(control_data_dir),
                     ensemble=True, say=said.append) == 0
    assert any("4 jobs (4 done already)" in s for s in said)  # two runs and their two BC warm-ups


def test_stacked_forward_equals_each_members_module_and_the_vmap_path(smoke_dataset):
    ds = smoke_dataset("run")
    members = [PresaLearner(_cfg("presa"), ds, s) for s in SEEDS]
    ens = PresaEnsemble(members)
    starts = np.stack([ln.feedback["chosen"][:5] for ln in members])  # (M, 5)
    goals = torch.stack([torch.as_tensor(ln.feedback["goal"][:5], dtype=torch.float32)[:, None, :]
                         for ln in members])
    sums = ens._sums(ens.params, ens.buffers, starts, goals)  # (M, 5), stacked baddbmm path
    with torch.no_grad():
        for m, ln in enumerate(members):  # each member's own module on its own segments
            torch.testing.assert_close(sums[m], ln._sums(ln.pi, starts[m], goals[m]), rtol=1e-5, atol=1e-4)
    ens._plain_mlp = False  # the general path: vmap over functional_call
    torch.testing.assert_close(ens._sums(ens.params, ens.buffers, starts, goals), sums, rtol=1e-5, atol=1e-4)
