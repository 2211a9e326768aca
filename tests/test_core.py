"""llm_safepref.core: light imports, the multiplier's constraint kinds, latent math, statistics, run records.

Expected values are computed by hand (or from published reference values) in the test, never by
calling the function under test a second time.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm_safepref.core import lagrange, latent, losses, provenance, stats, tables
from llm_safepref.core.cli import ToolParser
from llm_safepref.core.paths import cache_root

HEAVY = ("trl", "transformers", "peft", "datasets", "accelerate", "sentence_transformers")


def test_importing_the_core_loads_no_heavy_library():
    code = (
        "import sys, llm_safepref.core, llm_safepref.core.stats, llm_safepref.core.provenance, "
        "llm_safepref.core.tables, llm_safepref.core.cli, llm_safepref.losses, llm_safepref; "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_top_level_trainer_names_are_lazy():
    code = (
        "import sys, llm_safepref; assert 'trl' not in sys.modules; "
        "from llm_safepref import PresaTrainer, PresaConfig; "
        "print(PresaTrainer.__name__, PresaConfig.__name__, 'trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PresaTrainer", "PresaConfig", "True"]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import llm_safepref

        llm_safepref.Nope  # noqa: B018


# --------------------------------------------------------------------------- losses


def test_bradley_terry_hand_values_and_dpo_special_case():
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    got = losses.bradley_terry_loss(r_c, r_r)
    want = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # margin shifts the logit: -log sigmoid(1 - 0 - 0.25)
    assert losses.bradley_terry_loss(r_c[:1], r_r[:1], margin=0.25).item() == pytest.approx(math.log1p(math.exp(-0.75)))
    # Rewards beta * (S - S_ref): Bradley–Terry is DPO.
    s_c, s_r, ref_c, ref_r, beta = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]), 0.2
    torch.testing.assert_close(losses.bradley_terry_loss(beta * (s_c - ref_c), beta * (s_r - ref_r)),
                               losses.dpo_loss(s_c, s_r, ref_c, ref_r, beta=beta))
    assert losses.get_loss("bradley_terry") is losses.bradley_terry_loss


# --------------------------------------------------------------------------- multiplier


def test_cost_budget_multiplier_ascends_with_the_other_sign_and_is_unbounded():
    nu = lagrange.LagrangeMultiplier.for_cost_budget(20.0, lr=0.5)
    assert nu.value == 0.0 and nu.nu_max is None
    assert nu.constraint(30.0) == 10.0  # x - kappa: positive while over budget
    assert nu.update(30.0) == 5.0  # 0 + 0.5 * 10
    assert nu.update(1000.0) == 5.0 + 0.5 * 980.0  # no upper bound
    assert nu.update(-1e6) == 0.0  # projected to >= 0
    with pytest.raises(ValueError, match="sense"):
        lagrange.LagrangeMultiplier(delta=0.5, sense="between")
    with pytest.raises(ValueError, match="probability"):
        lagrange.LagrangeMultiplier(delta=20.0)  # a probability target must lie in [0, 1]


def test_probability_multiplier_unchanged():
    nu = lagrange.LagrangeMultiplier(delta=0.9, lr=0.5, init=1.0, nu_max=1.2)
    assert nu.update(0.5) == pytest.approx(1.2)  # 1 + 0.5 * 0.4 = 1.2, at the bound
    assert nu.update(0.0) == pytest.approx(1.2)  # clipped
    assert nu.update(1.0) == pytest.approx(1.15)


def test_pid_multiplier_hand_computed():
    pid = lagrange.PIDLagrangeMultiplier(delta=10.0, kp=0.1, ki=0.01, kd=0.5, init=0.0, nu_max=None)
    # e1 = 5: I = 5, D = 0 -> 0.5 + 0.05 = 0.55
    assert pid.update(15.0) == pytest.approx(0.55)
    # e2 = 8: I = 13, D = 3 -> 0.8 + 0.13 + 1.5 = 2.43
    assert pid.update(18.0) == pytest.approx(2.43)
    # e3 = -20: I = max(0, -7) = 0, D = 0 -> -2 -> projected to 0
    assert pid.update(-10.0) == 0.0
    state = pid.state_dict()
    fresh = lagrange.PIDLagrangeMultiplier(delta=10.0, kp=0.1, ki=0.01, kd=0.5, init=0.0, nu_max=None)
    fresh.load_state_dict(json.loads(json.dumps(state)))
    assert (fresh.integral, fresh.last_violation, fresh.num_updates) == (0.0, -20.0, 3)
    # Same next step from the restored state: e4 = 2, I = 2, D = 22 -> 0.2 + 0.02 + 11
    assert fresh.update(12.0) == pytest.approx(11.22)
    with pytest.raises(ValueError, match="'le' multiplier loaded into a 'ge'"):
        lagrange.LagrangeMultiplier(delta=0.5).load_state_dict(state)


# --------------------------------------------------------------------------- latent


def test_reparameterize_uses_given_noise_and_never_the_global_rng():
    mu, logvar = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, math.log(4.0)]])
    z = latent.reparameterize(mu, logvar, noise=torch.tensor([[0.5, 0.5]]))
    assert z[0].tolist() == pytest.approx([1.5, 0.0])  # sigma = 1 and 2
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    a = latent.reparameterize(mu, logvar, generator=g1)
    torch.manual_seed(1)
    b = latent.reparameterize(mu, logvar, generator=g2)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="noise or a `generator`|needs `noise`"):
        latent.reparameterize(mu, logvar)


def test_gaussian_prior_compose_and_kl():
    prior = latent.GaussianPrior(2, learned=True)
    assert sum(p.numel() for p in prior.parameters()) == 4
    with torch.no_grad():
        prior.mean.copy_(torch.tensor([1.0, 2.0]))
        prior.logvar.copy_(torch.tensor([0.0, math.log(9.0)]))
    eps = torch.tensor([[1.0, -1.0]])
    z = prior.compose(eps)
    assert z[0].tolist() == pytest.approx([2.0, -1.0])
    torch.testing.assert_close(prior.to_eps(z), eps)
    # KL(N(1, 1) || N(1, 1)) = 0 on dim 0; KL(N(2, 1) || N(2, 9)) = 0.5 (ln 9 - 0 + 1/9 - 1) on dim 1.
    kl = prior.kl(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2))
    assert kl.item() == pytest.approx(0.5 * (math.log(9.0) + 1 / 9 - 1))
    fixed = latent.GaussianPrior(3, learned=False)
    assert list(fixed.parameters()) == [] and fixed.mean.tolist() == [0.0] * 3


def test_pair_set_encoder_ignores_padding_and_pair_order():
    torch.manual_seed(0)
    enc = latent.PairSetEncoder(pair_dim=6, latent_dim=3, hidden_dim=16, num_heads=2).eval()
    pairs = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    mu, logvar = enc(pairs, mask)
    assert mu.shape == (2, 3) and logvar.shape == (2, 3)
    # A padded slot's content does not matter.
    other = pairs.clone()
    other[0, 3] = 100.0
    torch.testing.assert_close(enc(other, mask)[0], mu)
    # A set is a set: permuting its pairs gives the same posterior.
    perm = pairs[:, [2, 0, 1, 3]]
    torch.testing.assert_close(enc(perm, mask[:, [2, 0, 1, 3]])[0], mu, atol=1e-5, rtol=1e-5)
    # But the content matters.
    assert not torch.allclose(enc(pairs.flip(-1), mask)[0], mu)
    lo, hi = latent.LOGVAR_RANGE
    assert bool(((logvar >= lo) & (logvar <= hi)).all())
    with pytest.raises(ValueError, match=r"\(B, K, 6\)"):
        enc(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="at least one pair"):
        enc(pairs, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask of shape"):
        enc(pairs, torch.ones(2, 3, dtype=torch.bool))


def test_cyclic_kl_schedule_hand_values():
    s = latent.CyclicKLSchedule(max_weight=1e-3, total_steps=400, n_cycles=4, ratio=0.5)
    # Period 100; rise over steps 0..50 along 0.5 (1 - cos(pi t / 0.5)); flat after.
    assert s(0) == 0.0
    assert s(25) == pytest.approx(1e-3 * 0.5 * (1 - math.cos(math.pi * 0.25 / 0.5)))  # = 0.5e-3
    assert s(25) == pytest.approx(0.5e-3)
    assert s(50) == pytest.approx(1e-3) and s(99) == pytest.approx(1e-3)
    assert s(100) == 0.0 and s(125) == pytest.approx(0.5e-3)
    assert latent.CyclicKLSchedule(max_weight=0.2, total_steps=10, n_cycles=0)(3) == 0.2
    with pytest.raises(ValueError, match="ratio"):
        latent.CyclicKLSchedule(max_weight=1.0, total_steps=10, ratio=0.0)


# --------------------------------------------------------------------------- statistics


def test_wilson_interval_reference_values():
    # Reference values (Newcombe 1998, Table I): 0/10 -> [0, 0.2775]; 1/10 -> [0.0179, 0.4042];
    # 5/10 -> [0.2366, 0.7634]; 81/263 -> [0.2553, 0.3662].
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert stats.wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)
    assert stats.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert stats.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)
    summary = stats.rate_summary([True, False, False, False, False, False, False, False, False, False])
    assert summary["rate"] == 0.1 and summary["n"] == 10
    assert summary["ci"] == pytest.approx([0.0179, 0.4042], abs=1e-4)


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = np.arange(100, dtype=float)  # mean 49.5, sd of the mean ~2.9
    a, b = stats.bootstrap_ci(values, seed=3), stats.bootstrap_ci(values, seed=3)
    assert a == b
    assert a[0] < 49.5 < a[1] and 43 < a[0] < 46 and 53 < a[1] < 56
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_paired_comparison_and_mcnemar_hand_cases():
    a = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=float)
    same = stats.paired_bootstrap(a, a)
    assert same["diff"] == 0.0 and same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    # b is a everywhere but 5 prompts flipped to 0: diff = 0.5 on every resample's support.
    b = np.zeros(10)
    res = stats.paired_bootstrap(a, b, seed=1)
    assert res["diff"] == 0.5 and res["ci"][0] > 0 and res["p_value"] < 0.01
    # McNemar: 5 discordant pairs all one way -> p = 2 * (1/2)^5 = 0.0625.
    m = stats.mcnemar_exact(a > 0, b > 0)
    assert (m["a_only"], m["b_only"]) == (5, 0) and m["p_value"] == pytest.approx(0.0625)
    # 3 vs 1 discordant: p = 2 * (C(4,0) + C(4,1)) / 16 = 0.625.
    x = np.array([1, 1, 1, 0, 0], dtype=bool)
    y = np.array([0, 0, 0, 1, 0], dtype=bool)
    assert stats.mcnemar_exact(x, y)["p_value"] == pytest.approx(0.625)
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_bootstrap(a, a[:3])


def test_mean_std_over_seeds():
    assert stats.mean_std([0.1, 0.2, 0.3]) == pytest.approx({"mean": 0.2, "std": 0.1, "n": 3})
    assert stats.mean_std([0.4]) == {"mean": 0.4, "std": 0.0, "n": 1}


def test_two_level_bootstrap_reflects_seed_variance_not_only_prompts():
    rng = np.random.default_rng(0)
    P = 200
    # Same prompt outcomes in every seed: the seed level adds nothing.
    base = (rng.random(P) < 0.3).astype(float)
    identical = np.stack([base, base, base])
    lo_i, hi_i = stats.two_level_bootstrap(identical)
    lo_p, hi_p = stats.bootstrap_ci(base)
    assert hi_i - lo_i == pytest.approx(hi_p - lo_p, abs=0.02)
    # Seeds that disagree a lot (rates 0.1, 0.3, 0.5): the interval must be much wider than the
    # prompt-only interval of the pooled outcomes, which treats 600 outcomes as independent.
    spread = np.stack([(rng.random(P) < r).astype(float) for r in (0.1, 0.3, 0.5)])
    lo_s, hi_s = stats.two_level_bootstrap(spread)
    lo_pool, hi_pool = stats.bootstrap_ci(spread.ravel())
    assert (hi_s - lo_s) > 2 * (hi_pool - lo_pool)
    summary = stats.seed_summary(spread)
    assert summary["n_seeds"] == 3 and summary["n_prompts"] == P
    assert summary["mean"] == pytest.approx(spread.mean())
    assert summary["std"] == pytest.approx(np.std(spread.mean(axis=1), ddof=1))
    with pytest.raises(ValueError, match="same prompts"):
        stats.two_level_bootstrap([[1.0, 0.0], [1.0]])


def test_two_level_paired_bootstrap_detects_a_real_difference_only():
    rng = np.random.default_rng(1)
    P = 300
    a = np.stack([(rng.random(P) < 0.2).astype(float) for _ in range(3)])
    b = np.stack([(rng.random(P) < 0.5).astype(float) for _ in range(3)])
    res = stats.two_level_paired_bootstrap(a, b)
    assert res["diff"] == pytest.approx(a.mean() - b.mean())
    assert res["ci"][1] < 0 and res["p_value"] < 0.01
    null = stats.two_level_paired_bootstrap(a, a)
    assert null["diff"] == 0.0 and null["ci"][0] <= 0 <= null["ci"][1]


def test_rogan_gladen_hand_values_and_clipping():
    # (0.3 + 0.9 - 1) / (0.8 + 0.9 - 1) = 0.2 / 0.7
    assert stats.rogan_gladen(0.3, 0.8, 0.9) == pytest.approx(0.2 / 0.7)
    assert math.isnan(stats.rogan_gladen(0.3, 0.5, 0.5))
    res = stats.rogan_gladen_ci(30, 100, true_positives=80, n_positive=100, true_negatives=90, n_negative=100)
    assert res["rate"] == pytest.approx(0.2 / 0.7) and not res["clipped"]
    assert res["ci"][0] < 0.2 / 0.7 < res["ci"][1]
    # Apparent rate below the false-positive rate: the estimate leaves [0, 1] and is clipped.
    low = stats.rogan_gladen_ci(5, 100, true_positives=70, n_positive=100, true_negatives=72, n_negative=100)
    assert low["clipped"] and low["rate"] == 0.0 and low["ci"][0] == 0.0


# --------------------------------------------------------------------------- run records, tables, CLI


def test_redaction_of_records_and_command_lines(tmp_path):
    secret = "hf_SECRET_abc123"
    rec = provenance.run_record(
        command=f"accelerate launch recipes/presa_lora.py --hub_token {secret} --max_new_tokens 64",
        hyperparameters={"hub_token": secret, "max_new_tokens": 64, "nested": [{"api_key": secret}],
                         "pad_token": "<pad>"},
    )
    text = json.dumps(rec)
    assert secret not in text
    assert "--max_new_tokens 64" in rec["command"] and "--hub_token <redacted>" in rec["command"]
    assert rec["hyperparameters"]["max_new_tokens"] == 64 and rec["hyperparameters"]["pad_token"] == "<pad>"
    assert provenance.redact_command(["x", f"--hub-token={secret}"]) == "x --hub-token=<redacted>"
    for key in ("command", "git_revision", "versions", "lock_sha256", "machine", "date"):
        assert key in rec
    assert rec["versions"]["torch"].startswith("2.")
    path = provenance.write_json(tmp_path / "r" / "x.json", {"token": secret, "n": np.int64(3), "a": np.arange(2)})
    assert json.loads(path.read_text()) == {"token": "<redacted>", "n": 3, "a": [0, 1]}
    assert not list(tmp_path.glob("r/*.tmp"))


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LLM_SAFEPREF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llm_safepref"
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"


def test_tables():
    md = tables.markdown_table(["model", "rate"], [["base", 0.44], ["presa", None]], align="lr")
    assert md.splitlines() == ["| model | rate |", "| --- | ---: |", "| base | 0.440 |", "| presa | — |"]
    assert tables.markdown_table(["n"], [[3], [4]]).splitlines()[1] == "| ---: |"  # numbers right-aligned
    assert tables.format_with_ci(0.17, [0.11, 0.26]) == "0.170 [0.110, 0.260]"
    assert tables.format_mean_std(0.2, 0.01) == "0.200 ± 0.010"
    with pytest.raises(ValueError, match="cells"):
        tables.markdown_table(["a", "b"], [[1]])


def test_tool_parser_accepts_both_spellings():
    p = ToolParser(prog="t")
    p.add_argument("--label_noise", type=float, default=0.0)
    p.add_argument("--data-dir", default=None)
    assert p.parse_args(["--label-noise", "0.2"]).label_noise == 0.2
    assert p.parse_args(["--label_noise", "0.3", "--data_dir", "x"]).data_dir == "x"
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("go")
    s.add_argument("--max_steps", type=int, default=1)
    assert p.parse_args(["go", "--max-steps", "5"]).max_steps == 5
    assert "--label_noise" in p.format_help()


def test_current_command_names_the_module_of_python_dash_m(tmp_path):
    import llm_safepref.eval as ev
    from pathlib import Path

    main = str(Path(ev.__file__).with_name("__main__.py"))
    assert provenance.current_command([main, "--out", "x.json"]) == "python -m llm_safepref.eval --out x.json"
    assert provenance.redact({"tokenisation": "trl", "max_new_tokens": 8}) == {"tokenisation": "trl", "max_new_tokens": 8}


def test_read_jsonl_names_file_line_and_what_is_wrong(tmp_path):
    from llm_safepref.core.jsonl import read_jsonl

    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "x": 1}\n\n{"id": "b", "x": 2}\n', encoding="utf-8")
    assert read_jsonl(good, ("id",)) == [(1, {"id": "a", "x": 1}), (3, {"id": "b", "x": 2})]

    cases = {
        '{"id": "a"}\n{"id": "b",}\n': r"bad\.jsonl, line 2: not valid JSON \(Expecting property name .* at column 12\)",
        '{"id": "a"}\n[1, 2]\n': r"bad\.jsonl, line 2: expected a JSON object, got list",
        '{"id": "a"}\n{"x": 1}\n': r"bad\.jsonl, line 2: missing field\(s\) \['id'\]; expected \['id'\]",
    }
    bad = tmp_path / "bad.jsonl"
    for text, message in cases.items():
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(LookupError, match=message):
            read_jsonl(bad, ("id",), error=LookupError)
    with pytest.raises(ValueError, match=r"missing\.jsonl: no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
