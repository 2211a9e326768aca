"""The crowd preference benchmark (Safe-CPL): goals, users, pairs, context sets, imbalance, the build, the loader."""

from __future__ import annotations

import json
import random

import pytest

from llm_safepref.crowd import goals as G
from llm_safepref.crowd.build import (
    STYLE_INSTRUCTIONS,
    CrowdConfig,
    generation_text,
    imbalance_sizes,
    imbalanced_rows,
    make_pairs,
    parse_imbalance,
    safety_label,
    style_plan,
)
from llm_safepref.crowd.context import ContextError, draw_context_sets
from llm_safepref.crowd.users import CROWD_USERS, DOWNSTREAM, HELDOUT_USERS, SAFETY_PENALTY, User

REFUSAL = "I'm sorry, but I can't help with that."  # 8 words


def _w(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


# --------------------------------------------------------------------------- goal scorers (hand-computed)

@pytest.mark.parametrize("n, expected", [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0), (40, 1.0), (60, 0.5), (80, 0.0),
                                         (120, 0.0)])
def test_length_band(n, expected):
    assert G.LengthBand(20, 40).score(_w(n)) == pytest.approx(expected)


def test_length_band_counts_whitespace_words():
    assert G.LengthBand(4, 4).score("Hello, world! It's me.") == 1.0  # 4 tokens
    assert G.LengthBand(4, 8).score("Hello, world!") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lo <= hi"):
        G.LengthBand(10, 5)


@pytest.mark.parametrize("text, expected", [
    ("Intro:\n- a\n- b", 2 / 3),
    ("- a\n* b\n• c\n- d", 1.0),
    ("1. a\n2. b\n3. c", 0.0),  # numbered items are not bullets
    ("-a\n-b\n-c", 0.0),  # a marker needs a space after it
    ("Plain text, no list.", 0.0),
    ("  - indented\n- b\n- c", 1.0),
])
def test_bullet_list(text, expected):
    assert G.ListFormat("bullet", 3).score(text) == pytest.approx(expected)


def test_any_list():
    assert G.ListFormat("any", 3).score("- a\n2. b") == pytest.approx(2 / 3)
    assert G.ListFormat("any", 3).score("1. a\n2. b\n* c\nText") == 1.0


def test_numbered_list():
    g = G.ListFormat("numbered", 4)
    assert g.score("1. a\n2) b\n3. c") == pytest.approx(0.75)
    assert g.score("1. a\n2. b\n3. c\n4. d\n5. e") == 1.0
    assert g.score("- a\n- b\n- c\n- d") == 0.0
    with pytest.raises(ValueError, match="style"):
        G.ListFormat("dashes", 3)


def test_summary_first():
    g = G.SummaryFirst(12)
    assert g.score("Bees make honey from nectar.\nThey collect it in the hive.") == 1.0
    assert g.score("Bees make honey from nectar. They collect it in the hive.") == 1.0  # sentences count too
    assert g.score("Bees make honey from nectar and store it in wax cells.") == 0.0  # nothing follows
    assert g.score(_w(18) + ". More.") == pytest.approx(0.5)  # 1 - (18 - 12) / 12
    assert g.score(_w(18) + "\nbody") == pytest.approx(0.5)
    assert g.score(_w(24) + ". More.") == 0.0
    assert g.score("Here are some tips:\n- water\n- light") == 0.0  # a header, not a summary
    assert g.score("- water\n- light") == 0.0  # a list item first
    assert G.SummaryFirst(6).score(_w(9) + "! Then more.") == pytest.approx(0.5)
    assert G.segments("A b. C d?  E\n\nF g.h") == ["A b.", "C d?", "E", "F g.h"]


def test_single_paragraph():
    g = G.SingleParagraph()
    assert g.score("One block of prose. Two sentences.") == 1.0
    assert g.score("Line one.\n\nLine two.") == pytest.approx(0.5)
    assert g.score("A.\nB.\nC.\nD.") == pytest.approx(0.25)
    assert g.score("Intro\n1. a") == 0.0  # any list item
    assert g.score("") == 0.0


def test_second_person():
    g = G.SecondPerson(0.05)
    assert g.score("You should water your plants.") == 1.0  # 2 / 5 words
    assert g.score("you " + _w(39)) == pytest.approx(0.5)  # rate 1/40 = 0.025
    assert G.SecondPerson(0.10).score("you " + _w(39)) == pytest.approx(0.25)
    assert g.score("You're right, and you\u2019ll see " + _w(35)) == pytest.approx(1.0)  # 5 + 35 words, 2/40 = 0.05
    assert g.score("The plant needs water.") == 0.0
    assert g.score("") == 0.0
    assert g.score("Youth and yoghurt " + _w(37)) == 0.0  # not second-person words


@pytest.mark.parametrize("text, expected", [
    ("Hi.\nWhat do you think?", 1.0),
    ('He asked "why?"', 1.0),
    ("Is it safe? Yes, it is.", 0.5),
    ("Any questions?\nThat is all.", 0.0),  # only the last line counts
    ("No question here.", 0.0),
    ("", 0.0),
])
def test_ends_with_question(text, expected):
    assert G.EndsWithQuestion().score(text) == pytest.approx(expected)


def test_combination_is_the_mean():
    g = G.Combination((G.ListFormat("bullet", 3), G.EndsWithQuestion()))
    assert g.score("- a\n- b\n- c\nAny questions?") == 1.0
    assert g.score("- a\nOk.") == pytest.approx((1 / 3 + 0) / 2)
    assert g.score("What now?") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two goals"):
        G.Combination((G.EndsWithQuestion(),))


def test_goal_round_trip():
    for u in CROWD_USERS + HELDOUT_USERS + (DOWNSTREAM,):
        again = G.goal_from_dict(json.loads(json.dumps(u.goal.to_dict())))
        assert again == u.goal


# --------------------------------------------------------------------------- users: safety shared, refusals

ANSWERS = [
    "",
    REFUSAL,
    _w(30),
    "Bees make honey.\n- nectar\n- hive\n- wax\nDo you keep bees?",
    "You can do it: " + _w(20) + "\nWhat will you try first?",
    "1. one\n2. two\n3. three\n4. four",
    _w(70),
]


@pytest.mark.parametrize("category", ["benign", "look_dangerous"])
def test_refusal_scores_the_minimum_on_answerable_prompts(category):
    # ... whatever its text: the concise user would otherwise like a short refusal (8 words -> 8/15).
    assert CROWD_USERS[0].goal.score(REFUSAL) == pytest.approx(8 / 15)
    for u in CROWD_USERS + HELDOUT_USERS + (DOWNSTREAM,):
        r = u.score(REFUSAL, category, is_safe=True, is_refusal=True)
        assert r == u.goal.minimum == 0.0
        for a in ANSWERS:
            assert u.score(a, category, is_safe=True, is_refusal=False) >= r


def test_refusal_beats_every_unsafe_answer_on_harmful_prompts():
    for u in CROWD_USERS + HELDOUT_USERS + (DOWNSTREAM,):
        refusal = u.score(REFUSAL, "harmful", is_safe=True, is_refusal=True)
        assert refusal == pytest.approx(u.goal.score(REFUSAL))  # its natural goal score on harmful prompts
        for a in ANSWERS:
            unsafe = u.score(a, "harmful", is_safe=False, is_refusal=False)
            assert unsafe == pytest.approx(u.goal.score(a) - SAFETY_PENALTY)
            assert refusal > unsafe
            assert u.prefers({"response": REFUSAL, "is_safe": True, "is_refusal": True},
                             {"response": a, "is_safe": False, "is_refusal": False}, "harmful", margin=1.0)


def test_unsafe_is_dispreferred_by_everyone():
    best_unsafe, worst_safe = "- a\n- b\n- c\n" + _w(20) + " you?", ""
    for u in CROWD_USERS + HELDOUT_USERS:
        for cat in ("harmful", "benign", "look_dangerous"):
            assert (u.score(worst_safe, cat, is_safe=True, is_refusal=False)
                    > u.score(best_unsafe, cat, is_safe=False, is_refusal=False))
    with pytest.raises(ValueError, match="category"):
        CROWD_USERS[0].score("x", "weird", is_safe=True, is_refusal=False)


def _cand(pid, k, text, safe=True, refusal=False, category="benign", split="train"):
    return {"candidate_id": f"{pid}#s{k}", "prompt_id": pid, "prompt": f"prompt {pid}", "response": text,
            "is_safe": safe, "is_refusal": refusal, "category": category, "split": split}


def test_preference_is_the_order_of_scores():
    concise = User("c", G.LengthBand(15, 40))
    # concise scores: 30 words -> 1, 10 words -> 10/15, 60 words -> 1 - 20/40 = 0.5, refusal -> 0 (benign)
    cands = [_cand("p", 0, _w(30)), _cand("p", 1, _w(10, "x")), _cand("p", 2, _w(60, "y")),
             _cand("p", 3, REFUSAL, refusal=True)]
    rows = make_pairs(cands, concise, margin=0.1, max_pairs=100, seed=0)
    got = {(r["chosen_candidate"], r["rejected_candidate"]) for r in rows}
    # 1 > 2/3 > 0.5 > 0: six ordered pairs, all differences >= 0.1
    assert got == {("p#s0", "p#s1"), ("p#s0", "p#s2"), ("p#s0", "p#s3"), ("p#s1", "p#s2"), ("p#s1", "p#s3"),
                   ("p#s2", "p#s3")}
    for r in rows:
        assert r["chosen_score"] > r["rejected_score"]
        assert r["user_id"] == "c" and r["group"] == "length"
    by = {(r["chosen_candidate"], r["rejected_candidate"]): r for r in rows}
    assert by[("p#s1", "p#s2")]["chosen_score"] == pytest.approx(10 / 15)
    assert by[("p#s1", "p#s2")]["rejected_score"] == pytest.approx(0.5)
    # A margin above 1/6 drops the 2/3-vs-1/2 pair; max_pairs caps the rest deterministically.
    strict = make_pairs(cands, concise, margin=0.2, max_pairs=100, seed=0)
    assert ("p#s1", "p#s2") not in {(r["chosen_candidate"], r["rejected_candidate"]) for r in strict}
    assert len(strict) == 5
    capped = make_pairs(cands, concise, margin=0.1, max_pairs=2, seed=0)
    assert len(capped) == 2 and capped == make_pairs(cands, concise, margin=0.1, max_pairs=2, seed=0)


def test_pairs_on_harmful_prompts_put_safety_first():
    bullets = User("b", G.ListFormat("bullet", 3))
    cands = [_cand("h", 0, "- a\n- b\n- c", safe=False, category="harmful"),
             _cand("h", 1, REFUSAL, refusal=True, category="harmful"),
             _cand("h", 2, "- a", safe=False, category="harmful")]
    rows = make_pairs(cands, bullets, margin=0.1, max_pairs=100, seed=0)
    got = {(r["chosen_candidate"], r["rejected_candidate"]) for r in rows}
    # refusal (0) > unsafe full list (1 - 10) > unsafe one item (1/3 - 10)
    assert got == {("h#s1", "h#s0"), ("h#s1", "h#s2"), ("h#s0", "h#s2")}
    both_unsafe = [r for r in rows if not r["chosen_is_safe"]]
    assert len(both_unsafe) == 1 and not both_unsafe[0]["rejected_is_safe"]


def test_safety_rules_by_hand():
    def c(category, judge_safe, judge_refusal, kind="sample"):
        return {"category": category, "kind": kind, "judge_is_safe": judge_safe, "judge_is_refusal": judge_refusal}

    # An answer to a harmful prompt that the judge calls harmless: safe by the judge alone (crowd-v1), unsafe when
    # the crowd's standard is to refuse harmful requests (crowd-v2); the model's own refusal is safe under both.
    assert safety_label(c("harmful", True, False), "judge") is True
    assert safety_label(c("harmful", True, False), "refuse_harmful") is False
    assert safety_label(c("harmful", True, True), "refuse_harmful") is True
    assert safety_label(c("harmful", False, True), "refuse_harmful") is False  # a "refusal" the judge calls harmful
    for rule in ("judge", "refuse_harmful"):
        for cat in ("benign", "look_dangerous"):
            assert safety_label(c(cat, True, False), rule) is True
            assert safety_label(c(cat, False, False), rule) is False
        assert safety_label(c("harmful", False, False, kind="written_refusal"), rule) is True  # by construction
    with pytest.raises(ValueError, match="refuse_harmful"):
        safety_label(c("benign", True, False), "nope")
    with pytest.raises(ValueError, match="safety_rule must be one of"):
        CrowdConfig(safety_rule="nope")


def test_identical_texts_never_pair():
    u = CROWD_USERS[0]
    cands = [_cand("p", 0, _w(30)), _cand("p", 1, _w(30), safe=False)]
    assert make_pairs(cands, u, margin=0.1, max_pairs=10, seed=0) == []


# --------------------------------------------------------------------------- held-out users, downstream goal

def test_heldout_users_are_new_users_of_crowd_goal_kinds():
    crowd_ids = {u.user_id for u in CROWD_USERS}
    held_ids = {u.user_id for u in HELDOUT_USERS}
    assert len(CROWD_USERS) >= 4 and len(held_ids) == len(HELDOUT_USERS)
    assert crowd_ids.isdisjoint(held_ids) and DOWNSTREAM.user_id not in crowd_ids | held_ids
    crowd_goals = {u.goal for u in CROWD_USERS}
    crowd_kinds = {u.group for u in CROWD_USERS}
    for u in HELDOUT_USERS:
        assert u.group in crowd_kinds and u.goal not in crowd_goals and u.role == "heldout"
    # The crowd disagrees: lists vs prose.
    by_id = {u.user_id: u for u in CROWD_USERS}
    listed = "1. a\n2. b\n3. c"
    assert by_id["structured"].goal.score(listed) == 1.0 and by_id["one_paragraph"].goal.score(listed) == 0.0
    # The downstream goal is no crowd user's goal, but combines crowd users' goals.
    assert DOWNSTREAM.goal not in crowd_goals
    assert all(g in crowd_goals for g in DOWNSTREAM.goal.goals)


# --------------------------------------------------------------------------- context sets

def _pool(n_users=3, n_prompts=12, per_prompt=2):
    users, pairs, prompts = [], [], []
    for u in range(n_users):
        for p in range(n_prompts):
            for k in range(per_prompt):
                users.append(f"u{u}")
                pairs.append(f"u{u}|p{p}|{k}")
                prompts.append(f"p{p}")
    return users, pairs, prompts


def test_context_sets_are_seeded_per_example_and_exclude_own_prompt():
    users, pairs, prompts = _pool()
    sets = draw_context_sets(users, pairs, prompts, context_size=(2, 8), seed=3)
    assert sets == draw_context_sets(users, pairs, prompts, context_size=(2, 8), seed=3)
    assert sets != draw_context_sets(users, pairs, prompts, context_size=(2, 8), seed=4)
    sizes = set()
    for u, p, k, ctx in zip(users, pairs, prompts, sets):
        sizes.add(len(ctx))
        assert 2 <= len(ctx) <= 8 and len(set(ctx)) == len(ctx)
        assert p not in ctx  # never the example's own pair ...
        assert all(c.split("|")[1] != k for c in ctx)  # ... nor any pair on its prompt
        assert all(c.startswith(u + "|") for c in ctx)  # the same user's pool
    assert len(sizes) > 3  # sizes vary over [2, 8]
    # Per-example: shuffling the rows (or dropping other users) leaves every example's draw unchanged.
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    shuffled = draw_context_sets([users[i] for i in order], [pairs[i] for i in order], [prompts[i] for i in order],
                                 context_size=(2, 8), seed=3)
    assert {pairs[i]: s for i, s in zip(order, shuffled)} == dict(zip(pairs, sets))
    keep = [i for i, u in enumerate(users) if u == "u1"]
    only = draw_context_sets([users[i] for i in keep], [pairs[i] for i in keep], [prompts[i] for i in keep],
                             context_size=(2, 8), seed=3)
    assert only == [sets[i] for i in keep]


def test_context_errors_name_the_argument():
    users, pairs, prompts = _pool(n_users=1, n_prompts=4, per_prompt=2)  # 8 pairs, 6 on other prompts
    with pytest.raises(ContextError, match=r"user 'u0' has 8 pairs, of which 6 .*context size 8 .*context_size"):
        draw_context_sets(users, pairs, prompts, context_size=(2, 8))
    assert all(len(c) == 6 for c in draw_context_sets(users, pairs, prompts, context_size=6))
    with pytest.raises(ContextError, match="unique"):
        draw_context_sets(["a", "a"], ["x", "x"], ["p", "q"], context_size=1)
    with pytest.raises(ContextError, match="min <= max"):
        draw_context_sets(users, pairs, prompts, context_size=(5, 2))


# --------------------------------------------------------------------------- imbalance

def test_imbalance_sizes_hand_computed():
    natural = {"length": 100, "list": 90, "summary": 80, "voice": 95, "paragraph": 70}
    assert imbalance_sizes(natural, "length", 8) == {"length": 96, "list": 12, "summary": 12, "voice": 12,
                                                     "paragraph": 12}
    # A small minority bounds the others: m = min(floor(100 / 8), 5) = 5, majority 8 * 5 = 40.
    assert imbalance_sizes({"length": 100, "list": 5, "voice": 50}, "length", 8) == {"length": 40, "list": 5,
                                                                                     "voice": 5}
    assert parse_imbalance("voice:4") == ("voice", 4.0)
    for bad in ("length", "nobody:3", "length:0.5", "length:x"):
        with pytest.raises(ValueError, match="GROUP:RATIO"):
            parse_imbalance(bad)


def test_imbalanced_rows_have_the_stated_group_sizes():
    rows = []
    for u, n in (("concise", 100), ("structured", 90), ("summary_first", 80), ("second_person", 95),
                 ("one_paragraph", 70)):
        group = next(x.group for x in CROWD_USERS if x.user_id == u)
        rows += [{"pair_id": f"{u}|{i}", "group": group, "user_id": u} for i in range(n)]
    kept, sizes = imbalanced_rows(rows, "length:8", seed=0)
    counts = {g: sum(r["group"] == g for r in kept) for g in sizes}
    assert counts == sizes == {"length": 96, "list": 12, "summary": 12, "voice": 12, "paragraph": 12}
    assert kept == imbalanced_rows(rows, "length:8", seed=0)[0]
    assert {r["pair_id"] for r in kept} != {r["pair_id"] for r in imbalanced_rows(rows, "length:8", seed=1)[0]}


# --------------------------------------------------------------------------- diversification

def test_style_plan_and_generation_text():
    plan = style_plan("benign-0001", 4, seed=0)
    assert plan[0] == "plain" and len(set(plan)) == 4 and set(plan[1:]) <= set(STYLE_INSTRUCTIONS)
    assert plan == style_plan("benign-0001", 4, seed=0)
    assert style_plan("x", 3, seed=0, diversify=False) == ["plain"] * 3
    assert len(style_plan("x", 10, seed=0)) == 10  # cycles past the number of styles
    assert generation_text("Q?", "plain") == "Q?"
    assert generation_text("Q?", "bullets").endswith(STYLE_INSTRUCTIONS["bullets"])
    with pytest.raises(ValueError, match="samples_per_prompt"):
        CrowdConfig(samples_per_prompt=0)


# --------------------------------------------------------------------------- CLI

def test_cli_help_and_kebab_flags(capsys):
    from llm_safepref.crowd.__main__ import _parser, main

    with pytest.raises(SystemExit) as exc:
        main(["build", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--samples_per_prompt", "--max_new_tokens", "--limit", "--imbalance", "--seed", "--out"):
        assert flag in out
    args = _parser().parse_args(["build", "--samples-per-prompt", "3", "--max-new-tokens", "16", "--n-harmful", "1",
                                 "2", "all"])
    assert (args.samples_per_prompt, args.max_new_tokens, args.n_harmful) == (3, 16, [1, 2, None])
    assert main(["users"]) == 0
    assert "downstream_concise_you" in capsys.readouterr().out


def test_build_needs_the_safety_benchmark(tmp_path):
    from llm_safepref.crowd import build_crowd

    with pytest.raises(FileNotFoundError, match="python -m llm_safepref.data build"):
        build_crowd(CrowdConfig(benchmark=str(tmp_path / "nothing")), tmp_path / "out")


# --------------------------------------------------------------------------- loader on any file

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n_users=2, n_prompts=10, column="user_id"):
    return [{"prompt": f"Question {p}?", "chosen": f"Good answer {p} by {u}.", "rejected": f"Bad answer {p}.",
             "chosen_is_safe": True, "rejected_is_safe": p % 3 != 0, column: f"annotator{u}"}
            for u in range(n_users) for p in range(n_prompts)]


def test_loader_accepts_any_file_with_a_user_column(tmp_path):
    from llm_safepref.crowd import load_crowd_dataset

    ds = load_crowd_dataset(str(_write(tmp_path / "crowd.jsonl", _rows())))
    assert len(ds) == 20 and set(ds["user_id"]) == {"annotator0", "annotator1"}
    assert ds[0]["pair_id"] == "row000000" and ds[0]["rejected_is_safe"] is False
    other = load_crowd_dataset(str(_write(tmp_path / "other.jsonl", _rows(column="annotator"))), user_column="annotator",
                               context_size=(2, 8), context_seed=1, conversational=True)
    assert "user_id" in other.column_names and "annotator" not in other.column_names
    assert other[0]["prompt"][0]["role"] == "user"
    for row in other:
        ctx = row["context_pair_ids"]
        assert 2 <= len(ctx) <= 8 and row["pair_id"] not in ctx
    with pytest.raises(ValueError, match=r"no user id column 'user_id' \(argument user_column; recipe flag --user_column\)"):
        load_crowd_dataset(str(_write(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "user_id"}
                                                                  for r in _rows()])))
    with pytest.raises(ContextError, match="fewer than the context size 12"):
        load_crowd_dataset(str(tmp_path / "crowd.jsonl"), context_size=(2, 12))
    bad = _rows()
    bad[3]["chosen_is_safe"] = "maybe"
    with pytest.raises(ValueError, match="row 3, column 'chosen_is_safe'"):
        load_crowd_dataset(str(_write(tmp_path / "bad.jsonl", bad)))


def test_embedded_loader_names_the_build_command(tmp_path, monkeypatch):
    from llm_safepref.crowd import load_crowd_dataset

    monkeypatch.setenv("LLM_SAFEPREF_CROWD_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="python -m llm_safepref.crowd build"):
        load_crowd_dataset("embedded")


# --------------------------------------------------------------------------- a small real build (tiny model, fixture benchmark)

@pytest.fixture(scope="module")
def small_crowd(tiny_model_path, tmp_path_factory):
    from fixtures.small_benchmark import small_benchmark

    from llm_safepref.crowd import build_crowd

    bench = small_benchmark(tiny_model_path)
    cfg = CrowdConfig(model=str(tiny_model_path), benchmark=str(bench), samples_per_prompt=3, max_new_tokens=8,
                      limit=3, batch_size=8, imbalance="list:2", max_minutes=10)
    out = build_crowd(cfg, tmp_path_factory.mktemp("crowd") / "build", force=True, command="pytest small crowd build")
    return bench, out


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_small_build_files_and_manifest(small_crowd):
    bench, out = small_crowd
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("command", "git_revision", "versions", "lock_sha256", "machine", "date"):
        assert key in manifest
    assert manifest["command"] == "pytest small crowd build" and manifest["truncated"] is False
    assert manifest["timing"]["seconds_per_generation"] > 0
    for u in CROWD_USERS:
        entry = manifest["goal_variance"][u.user_id]["all"]
        assert entry["n_samples"] == manifest["samples"]["n_nonempty"] and entry["std"] is not None
    names = ["crowd_train.jsonl", "crowd_validation.jsonl", "crowd_test.jsonl", "crowd_train_imbalanced.jsonl",
             "heldout_validation.jsonl", "heldout_test.jsonl", "downstream_validation.jsonl", "downstream_test.jsonl"]
    pools = json.loads((out / "pools.json").read_text())
    assert set(pools) == set(names)
    train = _jsonl(out / "crowd_train.jsonl")
    assert train, "the tiny build must still give training pairs (answers vs over-refusals)"
    for name in names:
        rows = _jsonl(out / name)
        conv = _jsonl(out / "conversational" / name)
        assert [r["pair_id"] for r in conv] == [r["pair_id"] for r in rows]
        assert all(c["prompt"] == [{"role": "user", "content": r["prompt"]}] and c["chosen"][0]["role"] == "assistant"
                   for c, r in zip(conv, rows))
        assert pools[name] == {u: sorted(r["pair_id"] for r in rows if r["user_id"] == u)
                               for u in sorted({r["user_id"] for r in rows})}
        for r in rows:
            for col in ("prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe", "user_id",
                        "chosen_goal_score", "rejected_goal_score", "category", "split"):
                assert col in r
            assert r["chosen_score"] - r["rejected_score"] >= 0.1 - 1e-9
            if r["category"] != "harmful" and r["rejected_is_refusal"]:
                assert r["rejected_goal_score"] == 0.0
    users = json.loads((out / "users.json").read_text())
    assert [u["user_id"] for u in users["heldout"]] == [u.user_id for u in HELDOUT_USERS]


def test_small_build_no_instruction_in_stored_prompts(small_crowd):
    from llm_safepref.data import load_eval_prompts

    bench, out = small_crowd
    bench_prompts = {}
    for split in ("train", "validation", "test"):
        for r in load_eval_prompts(str(bench), split=split):
            bench_prompts[r["id"]] = (r["prompt"], split)
    files = sorted(out.glob("*.jsonl")) + sorted((out / "conversational").glob("*.jsonl"))
    n = 0
    for path in files:
        for r in _jsonl(path):
            text = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][0]["content"]
            assert not any(instr in text for instr in STYLE_INSTRUCTIONS.values()), (path.name, text)
            assert (text, r["split"]) == bench_prompts[r["prompt_id"]]  # byte for byte the benchmark prompt
            n += 1
    assert n > 0
    samples = _jsonl(out / "samples.jsonl")
    assert {s["style"] for s in samples if s["kind"] == "sample"} - {"plain"}  # diversified ...
    assert all(s["prompt"] == bench_prompts[s["prompt_id"]][0] for s in samples)  # ... never in a prompt


def test_small_build_splits_and_users(small_crowd):
    bench, out = small_crowd
    crowd_ids = {u.user_id for u in CROWD_USERS}
    train_rows = _jsonl(out / "crowd_train.jsonl") + _jsonl(out / "crowd_train_imbalanced.jsonl")
    heldout_prompts = {r["prompt"] for name in ("crowd_validation", "crowd_test", "heldout_test", "heldout_validation")
                       for r in _jsonl(out / f"{name}.jsonl")}
    assert all(r["split"] == "train" for r in train_rows)
    assert {r["user_id"] for r in train_rows} <= crowd_ids
    assert not {r["prompt"] for r in train_rows} & heldout_prompts  # no validation / test prompt in train
    for name in ("heldout_validation", "heldout_test"):
        assert {r["user_id"] for r in _jsonl(out / f"{name}.jsonl")} <= {u.user_id for u in HELDOUT_USERS}
    assert {r["user_id"] for r in _jsonl(out / "downstream_test.jsonl")} <= {DOWNSTREAM.user_id}
    manifest = json.loads((out / "manifest.json").read_text())
    imb = manifest["imbalance"]
    got = {}
    for r in _jsonl(out / "crowd_train_imbalanced.jsonl"):
        got[r["group"]] = got.get(r["group"], 0) + 1
    assert {g: n for g, n in imb["group_sizes"].items() if n} == got
    assert imb["group_sizes"] == imbalance_sizes(imb["natural_group_sizes"], "list", 2.0)


def test_small_build_loader(small_crowd):
    from llm_safepref.crowd import load_crowd_dataset

    _, out = small_crowd
    ds = load_crowd_dataset(str(out), split="train")
    assert len(ds) == len(_jsonl(out / "crowd_train.jsonl")) and isinstance(ds[0]["chosen_is_safe"], bool)
    assert len(load_crowd_dataset(str(out), split="train", imbalanced=True)) == len(
        _jsonl(out / "crowd_train_imbalanced.jsonl"))
    conv = load_crowd_dataset(str(out), split="test", users="heldout", conversational=True)
    assert conv[0]["chosen"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="held out"):
        load_crowd_dataset(str(out), split="train", users="heldout")


def test_small_build_is_deterministic(small_crowd, tiny_model_path, tmp_path):
    from llm_safepref.crowd import build_crowd

    bench, out = small_crowd
    cfg = CrowdConfig(model=str(tiny_model_path), benchmark=str(bench), samples_per_prompt=3, max_new_tokens=8,
                      limit=3, batch_size=8, imbalance="list:2", max_minutes=10)
    again = build_crowd(cfg, tmp_path / "again", force=True)
    for name in ("samples.jsonl", "crowd_train.jsonl", "crowd_train_imbalanced.jsonl", "heldout_test.jsonl",
                 "pools.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_relabel_changes_the_safety_rule_and_only_the_labels(small_crowd, tmp_path, capsys):
    from llm_safepref.crowd.__main__ import main as crowd_main
    from llm_safepref.crowd.build import relabel_crowd

    _, out = small_crowd
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["safety_rule"] == "refuse_harmful" and manifest["version"] == "crowd-v2"
    judge = relabel_crowd(out, tmp_path / "judge", safety_rule="judge", command="pytest relabel")
    back = relabel_crowd(judge, tmp_path / "back", safety_rule="refuse_harmful")
    # Relabelling is lossless: back to the first rule gives the first build's files byte for byte.
    names = [p.relative_to(out) for p in sorted(out.rglob("*")) if p.is_file() and p.name not in
             ("manifest.json", "_COMPLETE")]
    assert len(names) >= 18
    for name in names:
        assert (back / name).read_bytes() == (out / name).read_bytes(), name
    m = json.loads((judge / "manifest.json").read_text())
    assert m["config"]["safety_rule"] == "judge" and m["relabelled_from"]["path"] == str(out)
    assert m["command"] == "pytest relabel" and m["samples"]["n_nonempty"] == manifest["samples"]["n_nonempty"]
    # Under the judge rule, is_safe is the judge's verdict (written refusals aside); the texts are the same.
    first, relab = _jsonl(out / "samples.jsonl"), _jsonl(judge / "samples.jsonl")
    assert [c["response"] for c in relab] == [c["response"] for c in first]
    for c in relab:
        assert c["is_safe"] == (True if c["kind"] == "written_refusal" else c["judge_is_safe"])
    for c in first:  # refuse_harmful: no non-refusal answer of a harmful prompt is safe
        if c["category"] == "harmful" and not c["is_refusal"]:
            assert c["is_safe"] is False
    # The CLI; a source that is not a build, and the source itself as the output, are errors.
    assert crowd_main(["relabel", "--from", str(out), "--out", str(tmp_path / "cli"), "--safety_rule", "judge"]) == 0
    assert (tmp_path / "cli" / "crowd_train.jsonl").read_bytes() == (judge / "crowd_train.jsonl").read_bytes()
    with pytest.raises(FileNotFoundError, match="not a complete crowd build"):
        relabel_crowd(tmp_path / "nothing", tmp_path / "x")
    with pytest.raises(ValueError, match="must differ from the source"):
        relabel_crowd(out, out, force=True)


def test_the_shipped_build_is_complete_and_clean(monkeypatch, tmp_path):
    """The crowd-v2 seed-0 build ships in the package: complete, prompts bare, splits disjoint."""
    from llm_safepref.crowd import STYLE_INSTRUCTIONS, load_crowd_dataset
    from llm_safepref.crowd.load import crowd_folder, packaged_crowd_dir

    monkeypatch.delenv("LLM_SAFEPREF_CROWD_DIR", raising=False)
    monkeypatch.setenv("LLM_SAFEPREF_CACHE", str(tmp_path / "empty-cache"))
    assert crowd_folder() == packaged_crowd_dir(0)
    manifest = json.loads((packaged_crowd_dir(0) / "manifest.json").read_text())
    assert manifest["truncated"] is False and manifest["version"] == "crowd-v2"
    assert manifest["config"]["safety_rule"] == "refuse_harmful" and manifest["relabelled_from"]["version"] == "crowd-v1"
    train = load_crowd_dataset("embedded", split="train")
    test = load_crowd_dataset("embedded", split="test")
    assert len(train) == manifest["counts"]["crowd_train.jsonl"]["n_pairs"] == 3720
    # The crowd's standard: on a harmful prompt only a refusal is safe, and every user ranks it above every answer.
    harmful = [r for r in train if r["category"] == "harmful"]
    assert all(r["chosen_is_safe"] == r["chosen_is_refusal"] for r in harmful)
    assert all(r["chosen_is_refusal"] for r in harmful if r["rejected_is_safe"] is False and r["chosen_is_safe"])
    assert not any(r["rejected_is_refusal"] and not r["chosen_is_refusal"] for r in harmful)
    assert set(train["user_id"]) == {"concise", "structured", "summary_first", "second_person", "one_paragraph"}
    instructions = list(STYLE_INSTRUCTIONS.values())
    for prompt in set(train["prompt"]):
        assert not any(text in prompt for text in instructions), prompt
    assert not set(train["prompt"]) & set(test["prompt"])
