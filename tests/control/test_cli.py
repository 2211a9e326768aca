import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.control
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "control", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cli_builds_in_a_worker_process_then_stats_and_feedback(tmp_path):
    d = str(tmp_path)
    # --jobs 2 goes through the process pool; with one task only one worker (one core) runs.
    out = _cli("build-data", "--tasks", "run", "--scale", "smoke", "--data-dir", d, "--jobs", "2")
    assert "[run]" in out
    meta = json.loads((tmp_path / "run__smoke__seed0.json").read_text())
    assert meta["command"].startswith("python -m control build-data --tasks run --scale smoke")
    _cli("stats", "--tasks", "run", "--scale", "smoke", "--data-dir", d, "--out", d + "/s.json")
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats) == {"run"}
    assert stats["run"]["n_transitions"] == meta["n_transitions"]
    _cli("feedback", "--task", "run", "--scale", "smoke", "--data-dir", d, "--kind", "presa", "--n", "20",
         "--out", d + "/fb.npz")
    fb = np.load(d + "/fb.npz")
    assert fb["chosen"].shape == (20,) and fb["chosen_is_safe"].dtype == bool
    assert "tasks" in _cli("--help") or "build-data" in _cli("--help")


RUN_RECORD_KEYS = {"command", "git_revision", "versions", "lock_sha256", "machine", "date"}


def _subcommands():
    from control.__main__ import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return parser, sub.choices


def test_every_command_and_tool_answers_help():
    _, subs = _subcommands()
    assert set(subs) == {"tasks", "build-data", "stats", "feedback", "suite"}
    top = _cli("--help")
    for name in subs:
        assert name in top
        out = _cli(name, "--help")
        assert out.startswith(f"usage: python -m control {name}")
    for tool in ("control.gaits", "control.segment_report"):
        proc = subprocess.run([sys.executable, "-m", tool, "--help"], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.startswith(f"usage: python -m {tool}")


def test_flags_are_snake_case_with_kebab_case_accepted():
    parser, subs = _subcommands()
    for name, sp in subs.items():
        for action in sp._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and longs != ["--help"]:
                # The canonical spelling comes first (what --help shows); kebab is an alias.
                assert "-" not in longs[0][2:], (name, longs)
                assert all(o in longs for o in {longs[0], "--" + longs[0][2:].replace("_", "-")}), (name, longs)
    snake = parser.parse_args(["feedback", "--task", "run", "--kind", "presa", "--label_noise", "0.2",
                               "--data_dir", "/d", "--segment_length", "16", "--out", "x.npz"])
    kebab = parser.parse_args(["feedback", "--task", "run", "--kind", "presa", "--label-noise", "0.2",
                               "--data-dir", "/d", "--segment-length", "16", "--out", "x.npz"])
    assert vars(snake) == vars(kebab)
    assert (snake.label_noise, snake.data_dir, snake.segment_length) == (0.2, "/d", 16)


def test_feedback_presa_honours_beta_and_label_noise(smoke_dataset, control_data_dir, tmp_path):
    from control.__main__ import main
    from control.feedback import PresaFeedbackConfig, make_presa_feedback

    ds = smoke_dataset("run")
    base = ["feedback", "--task", "run", "--scale", "smoke", "--data-dir", str(control_data_dir), "--kind", "presa",
            "--n", "300", "--segment-length", "32"]

    def run(*extra):
        out = tmp_path / f"fb{len(list(tmp_path.iterdir()))}.npz"
        assert main(base + list(extra) + ["--out", str(out)]) == 0
        return np.load(out)

    clean, noisy, boltz = run(), run("--label-noise", "0.3"), run("--beta", "1e-6")
    wrong = lambda fb: float((fb["chosen_return"] < fb["rejected_return"]).mean())  # noqa: E731
    assert wrong(clean) == 0.0
    assert 0.2 < wrong(noisy) < 0.4
    assert 0.35 < wrong(boltz) < 0.65  # beta -> 0: near-random labels
    # The CLI's feedback is the library's for the same configuration (the seed is the build seed, 0).
    for fb, kw in ((noisy, {"label_noise": 0.3}), (boltz, {"beta": 1e-6})):
        ref = make_presa_feedback(ds, PresaFeedbackConfig(n_pairs=300, segment_length=32, seed=0, **kw))
        for k in ("chosen", "rejected", "chosen_is_safe", "rejected_is_safe"):
            np.testing.assert_array_equal(fb[k], ref[k], err_msg=k)
        meta = json.loads(str(fb["meta"]))
        assert RUN_RECORD_KEYS <= set(meta)
        assert all(meta["config"][k] == v for k, v in kw.items())
        assert meta["command"].startswith("python -m control feedback --task run")
    # Safety labels are not preference labels: noise leaves them as the cost rule says.
    np.testing.assert_array_equal(noisy["chosen_is_safe"], noisy["chosen_cost"] <= float(noisy["cost_threshold"]))


def test_stats_and_build_carry_the_core_run_record(smoke_dataset, control_data_dir, tmp_path):
    from control.__main__ import main
    from llm_safepref.core.provenance import machine_description

    smoke_dataset("run")
    out = tmp_path / "stats.json"
    assert main(["stats", "--tasks", "run", "--scale", "smoke", "--data_dir", str(control_data_dir),
                 "--out", str(out)]) == 0
    st = json.loads(out.read_text())["run"]
    assert RUN_RECORD_KEYS <= set(st["stats_run_record"])
    assert st["stats_run_record"]["command"] == (f"python -m control stats --tasks run --scale smoke --data_dir "
                                                 f"{control_data_dir} --out {out}")
    # The build's record (from the dataset's metadata): core.provenance's fields and machine string.
    assert st["command"] == "pytest" and st["machine"] == machine_description()
    assert {"git_revision", "versions", "lock_sha256", "date"} <= {k for k, v in st.items() if v is not None}
