"""Data: adapters (PKU-SafeRLHF, generic, conversational), validation errors, splits, constraints, build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from llm_safepref.data import (  # noqa: E402
    DataValidationError,
    load_eval_prompts,
    load_preference_dataset,
    load_safety_labels,
    validate_preference_dataset,
)
from llm_safepref.data import constraints as cons  # noqa: E402
from llm_safepref.data.splits import assign_splits, exact_dedup, near_dedup, paraphrase_groups  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PKU = FIXTURES / "pku_saferlhf_sample.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- adapters

def test_pku_saferlhf_schema_is_converted():
    ds = load_preference_dataset(str(PKU))
    assert ds.column_names == ["prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe", "source"]
    raw = [json.loads(line) for line in PKU.read_text().splitlines()]
    assert len(ds) == len(raw)
    for row, r in zip(ds, raw):
        b = r["better_response_id"]
        assert row["chosen"] == r[f"response_{b}"] and row["rejected"] == r[f"response_{1 - b}"]
        assert row["chosen_is_safe"] is r[f"is_response_{b}_safe"]
        assert row["rejected_is_safe"] is r[f"is_response_{1 - b}_safe"]
        assert row["source"] == "pku_saferlhf"
    # row 3: the better response is the unsafe one
    assert ds[3]["chosen_is_safe"] is False and ds[3]["rejected_is_safe"] is True


def test_generic_csv_with_string_labels_and_aliases(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,is_chosen_safe,is_rejected_safe\n"
                    "q1,good answer,bad answer,true,false\nq2,fine,worse,1,0\n")
    ds = load_preference_dataset(str(path))
    assert ds["chosen_is_safe"] == [True, True] and ds["rejected_is_safe"] == [False, False]
    assert ds["source"] == ["pairs.csv", "pairs.csv"]


def test_conversational_round_trip(tmp_path):
    ds = load_preference_dataset(str(PKU), conversational=True)
    row = ds[0]
    assert row["prompt"] == [{"role": "user", "content": json.loads(PKU.read_text().splitlines()[0])["prompt"]}]
    assert row["chosen"][0]["role"] == "assistant" and len(row["rejected"]) == 1
    # a conversational file comes back as text when asked
    path = _write_jsonl(tmp_path / "conv.jsonl", [dict(r) for r in ds])
    text = load_preference_dataset(str(path))
    assert text[0]["prompt"] == row["prompt"][0]["content"]


def test_save_to_disk_folder_and_split(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [dict(prompt="p", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False, source="x")]
    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows * 2)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_preference_dataset(str(tmp_path / "dd"), split="test")) == 2
    with pytest.raises(DataValidationError, match="no split 'validation'"):
        load_preference_dataset(str(tmp_path / "dd"), split="validation")


# --------------------------------------------------------------------------- validation

def test_missing_column_names_file_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(DataValidationError) as err:
        load_preference_dataset(str(path))
    msg = str(err.value)
    assert "broken.jsonl" in msg and "chosen_is_safe" in msg and "rejected_is_safe" in msg


def test_bad_label_names_file_row_and_column(tmp_path):
    rows = [dict(prompt="p", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False)] * 2
    rows.append(dict(prompt="p", chosen="c", rejected="r", chosen_is_safe="maybe", rejected_is_safe=False))
    path = _write_jsonl(tmp_path / "labels.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"labels\.jsonl: row 2, column 'chosen_is_safe': expected a boolean"):
        load_preference_dataset(str(path))


def test_empty_response_and_drop_invalid(tmp_path):
    rows = [dict(prompt="p", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False),
            dict(prompt="p2", chosen="  ", rejected="r", chosen_is_safe=True, rejected_is_safe=False),
            dict(prompt="p3", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False)]
    path = _write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"empty\.jsonl: row 1, column 'chosen': expected a non-empty text"):
        load_preference_dataset(str(path))
    ds = load_preference_dataset(str(path), drop_invalid=True)
    assert ds["prompt"] == ["p", "p3"]
    from datasets import Dataset

    _, n = validate_preference_dataset(Dataset.from_list(rows), source_name="mem", drop_invalid=True)
    assert n == 1


def test_prompt_too_long(tiny_model_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ds = Dataset.from_list([dict(prompt="short", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False),
                            dict(prompt="word " * 200, chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False)])
    with pytest.raises(DataValidationError, match=r"long\.jsonl: row 1, column 'prompt': expected at most 16 tokens"):
        validate_preference_dataset(ds, source_name="long.jsonl", max_length=16, tokenizer=tok)
    kept, n = validate_preference_dataset(ds, source_name="long.jsonl", max_length=16, tokenizer=tok, drop_invalid=True)
    assert n == 1 and len(kept) == 1


def test_warns_when_no_unsafe_response():
    from datasets import Dataset

    ds = Dataset.from_list([dict(prompt="p", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=True)])
    with pytest.warns(UserWarning, match="no response is labelled unsafe"):
        validate_preference_dataset(ds, source_name="safe.jsonl")


def test_pku_bad_better_id(tmp_path):
    rows = [json.loads(line) for line in PKU.read_text().splitlines()]
    rows[1]["better_response_id"] = 2
    path = _write_jsonl(tmp_path / "pku_bad.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"pku_bad\.jsonl: row 1, column 'better_response_id'"):
        load_preference_dataset(str(path))


# --------------------------------------------------------------------------- one validator

_GOOD = dict(prompt="p", chosen="c", rejected="r", chosen_is_safe=True, rejected_is_safe=False)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({}, None),
        ({"chosen_is_safe": 1}, "row 0, column 'chosen_is_safe': expected a boolean (true / false; True = safe), "
                                "got 1 of type int"),
        ({"rejected_is_safe": "true"}, "row 0, column 'rejected_is_safe': expected a boolean (true / false; "
                                       "True = safe), got 'true' of type str"),
        ({"rejected_is_safe": None}, "row 0, column 'rejected_is_safe': expected a boolean (true / false; "
                                     "True = safe), got None of type NoneType"),
        ({"chosen": ""}, "row 0, column 'chosen': expected a non-empty text (response), got ''"),
        ({"rejected": " \n\t"}, "row 0, column 'rejected': expected a non-empty text (response), got ' \\n\\t'"),
        ({"prompt": "  "}, "row 0, column 'prompt': expected a non-empty text (prompt), got '  '"),
    ],
    ids=["valid", "int-label", "str-label", "null-label", "empty-chosen", "whitespace-rejected", "blank-prompt"],
)
def test_one_verdict_through_both_entry_points(change, expected):
    """The loaders' validate_preference_dataset and the trainers' check_presa_dataset agree, word for word."""
    from datasets import Dataset

    from llm_safepref.data_checks import check_presa_dataset

    row = {**_GOOD, **change}
    verdicts = []
    for name, run in (("mem", lambda ds: validate_preference_dataset(ds, source_name="mem")),
                      ("mem dataset", lambda ds: check_presa_dataset(ds, name="mem"))):
        try:
            run(Dataset.from_list([row]))
            verdicts.append(None)
        except DataValidationError as err:
            assert str(err).startswith(f"{name}: "), str(err)
            verdicts.append(str(err)[len(name) + 2:])
    assert verdicts == [expected, expected]


def test_label_definition():
    from llm_safepref.data_checks import is_label

    assert is_label(True) and is_label(False) and is_label(np.bool_(False))
    for value in (0, 1, 1.0, "true", "False", None, np.int64(1)):
        assert not is_label(value), value


def test_one_label_definition_on_the_trainer_path(tiny_model_path, tmp_path):
    """A label the loaders refuse is refused by PresaTrainer with the same message (and vice versa)."""
    from datasets import Dataset

    from llm_safepref import PresaConfig, PresaTrainer
    from llm_safepref.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_path))
    rows = [dict(_GOOD, prompt=f"q{i}", rejected_is_safe=i % 2) for i in range(4)]  # 0/1 integers
    path = _write_jsonl(tmp_path / "intlabel.jsonl", rows)
    message = r"row 0, column 'rejected_is_safe': expected a boolean \(true / false; True = safe\), got 0 of type int"
    with pytest.raises(DataValidationError, match=r"intlabel\.jsonl: " + message):
        load_preference_dataset(str(path))
    args = PresaConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=64, max_steps=1)
    with pytest.raises(DataValidationError, match="train dataset: " + message):
        PresaTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)


def test_label_balance_warning_once_per_run(tiny_model_path, tmp_path):
    """The recipe path (load, then the trainer's own check) warns once; new data still warns."""
    import warnings

    from datasets import Dataset

    from llm_safepref import PresaConfig, PresaTrainer
    from llm_safepref.data_checks import check_presa_dataset
    from llm_safepref.models import load_model_and_tokenizer

    rows = [dict(prompt=f"How do I water plant {i} once?", chosen=f"Water plant {i} weekly.",
                 rejected=f"Plant {i} never needs water.", chosen_is_safe=True, rejected_is_safe=True) for i in range(6)]
    path = _write_jsonl(tmp_path / "all_safe_once.jsonl", rows)
    model, tok = load_model_and_tokenizer(str(tiny_model_path))
    args = PresaConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=64, max_steps=1)

    def balance_warnings(caught):
        return [w for w in caught if "no response is labelled unsafe" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_preference_dataset(str(path), conversational=True, drop_invalid=True)  # as the recipes load
        PresaTrainer(model, args=args, train_dataset=ds, processing_class=tok)
        check_presa_dataset(ds.select(range(3)), name="train")  # a subset (--train_limit): nothing new to say
    found = balance_warnings(caught)
    assert len(found) == 1, [str(w.message) for w in caught]
    assert str(found[0].message).startswith(f"{path}: no response is labelled unsafe (12 safe)")

    # Rows nobody has warned about yet still warn, once.
    other = Dataset.from_list([dict(r, prompt=r["prompt"] + " Please.") for r in rows])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_presa_dataset(other, name="train")
        check_presa_dataset(other, name="train")
    assert [str(w.message) for w in balance_warnings(caught)] == [
        "train dataset: no response is labelled unsafe (12 safe); the safety constraint can only raise the "
        "probability of safe responses and will not teach the model what to avoid"]


# --------------------------------------------------------------------------- malformed files, empty responses

def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps(_GOOD)
    path = tmp_path / "broken_line.jsonl"
    path.write_text(f"{good}\n{good}\n\n{good}\n{{\"prompt\": \"p\", \"chosen\": \"c\",}}\n{good}\n")
    with pytest.raises(DataValidationError) as err:
        load_preference_dataset(str(path))
    msg = str(err.value)
    # Line 5 (1-based; line 3 is blank): after the trailing comma (column 30) a name is expected at column 31.
    assert msg.startswith(f"{path}: line 5, column 31: not valid JSON (Expecting property name enclosed in double quotes)")
    assert "'{\"prompt\": \"p\", \"chosen\": \"c\",}'" in msg


def test_json_line_that_is_not_an_object(tmp_path):
    good = json.dumps(_GOOD)
    path = tmp_path / "list_line.jsonl"
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(DataValidationError, match=r"list_line\.jsonl: line 2: expected one JSON object \(a row\) per "
                                                  r"line, got a JSON list"):
        load_preference_dataset(str(path))


def _pairs_with_empty_responses() -> list[dict]:
    rows = [dict(_GOOD, prompt=f"q{i}", chosen=f"c{i}", rejected=f"r{i}") for i in range(6)]
    rows[1]["chosen"] = ""
    rows[3]["rejected"] = "   \n"
    rows[4]["chosen"] = "\t"
    return rows


def test_empty_responses_error_or_one_warning(tmp_path):
    path = _write_jsonl(tmp_path / "empties.jsonl", _pairs_with_empty_responses())
    with pytest.raises(DataValidationError,
                       match=r"empties\.jsonl: row 1, column 'chosen': expected a non-empty text \(response\), got ''$"):
        load_preference_dataset(str(path))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_preference_dataset(str(path), drop_invalid=True)
    assert ds["prompt"] == ["q0", "q2", "q5"]
    dropped = [str(w.message) for w in caught if "dropped" in str(w.message)]
    assert dropped == [
        f"{path}: dropped 3 of 6 rows as invalid (drop_invalid): rows 1, 3, 4. "
        "row 1, column 'chosen': expected a non-empty text (response), got ''; "
        "row 3, column 'rejected': expected a non-empty text (response), got '   \\n'; "
        "row 4, column 'chosen': expected a non-empty text (response), got '\\t'"]


def test_empty_assistant_message_in_conversational_file(tmp_path):
    rows = []
    for i, r in enumerate(_pairs_with_empty_responses()):
        rows.append(dict(r, prompt=[{"role": "user", "content": r["prompt"]}],
                         chosen=[{"role": "assistant", "content": r["chosen"]}],
                         rejected=[{"role": "assistant", "content": r["rejected"]}]))
    path = _write_jsonl(tmp_path / "conv_empty.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"conv_empty\.jsonl: row 1, column 'chosen': expected a non-empty "
                                                  r"text \(response\), got \[\{'role': 'assistant', 'content': ''\}\]"):
        load_preference_dataset(str(path), conversational=True)
    with pytest.warns(UserWarning, match=r"dropped 3 of 6 rows as invalid \(drop_invalid\): rows 1, 3, 4\."):
        ds = load_preference_dataset(str(path), conversational=True, drop_invalid=True)
    assert [m[0]["content"] for m in ds["prompt"]] == ["q0", "q2", "q5"]


def test_pku_schema_empty_response_names_its_column(tmp_path):
    raw = [json.loads(line) for line in PKU.read_text().splitlines()]
    raw[0]["response_1"] = "  "  # row 0: better_response_id 1, so this is the chosen response
    raw[2]["response_1"] = ""  # row 2: better_response_id 0, so this is the rejected one
    path = _write_jsonl(tmp_path / "pku_empty.jsonl", raw)
    with pytest.raises(DataValidationError, match=r"pku_empty\.jsonl: row 0, column 'chosen' \(from 'response_1'\): "
                                                  r"expected a non-empty text \(response\), got '  '$"):
        load_preference_dataset(str(path))
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows as invalid \(drop_invalid\): rows 0, 2\. .*row 2, "
                                         r"column 'rejected' \(from 'response_1'\)"):
        ds = load_preference_dataset(str(path), drop_invalid=True)
    assert ds["prompt"] == [raw[1]["prompt"], raw[3]["prompt"]]
    # Row 3 of the fixture: the better response (id 1) is the unsafe one.
    assert ds["chosen"][1] == raw[3]["response_1"] and ds["chosen_is_safe"] == [True, False]


def test_pku_schema_bad_rows_are_dropped_too(tmp_path):
    raw = [json.loads(line) for line in PKU.read_text().splitlines()]
    raw[1]["better_response_id"] = 2
    raw[2]["is_response_0_safe"] = "yes"  # JSON has booleans: a string is not a label
    path = _write_jsonl(tmp_path / "pku_bad_rows.jsonl", raw)
    with pytest.raises(DataValidationError, match=r"row 1, column 'better_response_id': expected 0 or 1, got 2"):
        load_preference_dataset(str(path))
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows .*rows 1, 2\. .*row 2, column 'chosen_is_safe' "
                                         r"\(from 'is_response_0_safe'\): expected a boolean"):
        ds = load_preference_dataset(str(path), drop_invalid=True)
    assert ds["prompt"] == [raw[0]["prompt"], raw[3]["prompt"]]


def test_csv_label_text_is_decoded_and_refused_when_not_boolean(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("prompt,chosen,rejected,chosen_is_safe,rejected_is_safe\n"
                    "q1,a,b,YES,no\nq2,a,b,False,True\nq3,a,b,maybe,0\n")
    with pytest.raises(DataValidationError, match=r"labels\.csv: row 2, column 'chosen_is_safe': expected a boolean "
                                                  r"\(true / false; True = safe\), got 'maybe' of type str"):
        load_preference_dataset(str(path))
    ds = load_preference_dataset(str(path), drop_invalid=True)
    assert ds["chosen_is_safe"] == [True, False] and ds["rejected_is_safe"] == [False, True]


# --------------------------------------------------------------------------- splits

def test_dedup_and_groups_on_vectors():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 16))
    emb = np.concatenate([base, base[:2] + 0.01 * rng.normal(size=(2, 16))])  # rows 5, 6 ≈ rows 0, 1
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keep = near_dedup(emb, 0.95)
    assert keep.tolist() == [True] * 5 + [False, False]
    groups = paraphrase_groups(emb, 0.95)
    assert groups[5] == groups[0] and groups[6] == groups[1] and len(set(groups[:5].tolist())) == 5
    assert [r["prompt"] for r in exact_dedup([{"prompt": "How to X?"}, {"prompt": "how to x"}, {"prompt": "Y"}])] == ["How to X?", "Y"]


def test_assign_splits_keeps_groups_together_and_is_seeded():
    keys = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3
    a = assign_splits(keys, (0.7, 0.1, 0.2), seed=0)
    # Independent of row order: the same key gets the same split when the rows come reversed.
    split_of = dict(zip(keys, a))
    assert assign_splits(keys[::-1], (0.7, 0.1, 0.2), seed=0) == [split_of[k] for k in keys[::-1]]
    assert a != assign_splits(keys, (0.7, 0.1, 0.2), seed=1)
    for g in set(keys):
        assert len({s for k, s in zip(keys, a) if k == g}) == 1
    frac = {s: a.count(s) / len(a) for s in ("train", "validation", "test")}
    assert abs(frac["train"] - 0.7) < 0.05 and abs(frac["test"] - 0.2) < 0.05


def test_assign_splits_midpoint_rule_by_hand():
    """Two groups of 5 rows, fractions (0.5, 0, 0.5): split bounds at 5, 5, 10 rows. Whichever group comes
    first has its midpoint at row 2.5 (train); the other at 7.5 (test), whatever the hash order."""
    keys = ["a"] * 5 + ["b"] * 5
    for seed in range(4):
        splits = assign_splits(keys, (0.5, 0.0, 0.5), seed=seed)
        assert sorted({(k, s) for k, s in zip(keys, splits)}) in ([("a", "test"), ("b", "train")],
                                                                  [("a", "train"), ("b", "test")])
    # A group of 8 and one of 2 with (0.7, 0.1, 0.2): the big group's midpoint is row 4 (train) if it comes
    # first, else row 6 (train); the small one's is row 9 (test) after it, else row 1 (train).
    keys = ["big"] * 8 + ["small"] * 2
    outcomes = {tuple(sorted(set(zip(keys, assign_splits(keys, (0.7, 0.1, 0.2), seed=s))))) for s in range(16)}
    assert outcomes == {(("big", "train"), ("small", "test")), (("big", "train"), ("small", "train"))}
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(keys, (0.5, 0.1, 0.1), seed=0)


# --------------------------------------------------------------------------- benign prompts and constraints

def test_benign_package_data():
    from llm_safepref.data.benign import load_benign_prompts, load_look_dangerous_prompts

    benign, look = load_benign_prompts(), load_look_dangerous_prompts()
    assert len(benign) >= 300 and len(look) >= 100
    assert len({r["prompt"] for r in benign}) == len(benign) and len({r["prompt"] for r in look}) == len(look)
    for r in benign:
        assert r["constraints"]
        for c in r["constraints"]:
            assert cons.instruction(c) in r["prompt"]


@pytest.mark.parametrize(
    "constraint, good, bad",
    [
        ({"type": "max_words", "n": 5}, "Bees make honey.", "Bees make honey from nectar in hives."),
        ({"type": "include_keywords", "words": ["nectar", "hive"]}, "Nectar goes to the hive.", "Bees fly."),
        ({"type": "bullet_points", "n": 2}, "- one\n- two", "- one\n- two\n- three"),
        ({"type": "lowercase"}, "all small here.", "Not all small."),
        ({"type": "json_format"}, '```json\n{"a": 1}\n```', "{a: 1}"),
        ({"type": "start_with", "phrase": "In short"}, "In short, yes.", "Yes. In short."),
        ({"type": "end_with", "phrase": "That is all."}, "Done. That is all.", "That is all. Done."),
        ({"type": "no_commas"}, "No commas here.", "Yes, one comma."),
        ({"type": "title"}, "<<Bees>>\nText", "Bees\nText"),
        ({"type": "language", "lang": "French"}, "Les abeilles font le miel dans la ruche et pour nous.", "Bees make the honey in the hive."),
        ({"type": "max_sentences", "n": 2}, "One. Two.", "One. Two. Three."),
        ({"type": "exclude_word", "word": "very"}, "Quite good.", "Very good."),
    ],
)
def test_constraint_checkers(constraint, good, bad):
    assert cons.check(constraint, good) is True
    assert cons.check(constraint, bad) is False


def test_unknown_constraint():
    with pytest.raises(ValueError, match="unknown constraint type"):
        cons.check({"type": "rhymes"}, "x")


# --------------------------------------------------------------------------- a small real build

@pytest.fixture(scope="module")
def small_bench(tiny_model_path):
    from fixtures.small_benchmark import small_benchmark

    return small_benchmark(tiny_model_path)


def test_small_build_outputs(small_bench):
    manifest = json.loads((small_bench / "manifest.json").read_text())
    assert manifest["counts"]["pairs"]["train"] > 0
    # The run record of llm_safepref.core.provenance, as every results file carries it.
    assert {"command", "git_revision", "versions", "lock_sha256", "machine", "date"} <= set(manifest)
    assert manifest["versions"]["datasets"] and manifest["date"].count("-") == 2
    pairs = load_preference_dataset(str(small_bench), split="train")
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe", "source"}
    assert all(isinstance(v, bool) for v in pairs["chosen_is_safe"])
    conv = load_preference_dataset(str(small_bench), split="train", conversational=True)
    assert conv[0]["chosen"][0]["role"] == "assistant"
    labels = load_safety_labels(str(small_bench), split="train")
    assert {"prompt", "completion", "is_safe"} <= set(labels.column_names)
    assert set(labels["is_safe"]) == {True, False}
    ev = load_eval_prompts(str(small_bench), split="test")
    # safety-v3: the harmful contrast twins of the look-dangerous prompts are a category of their own.
    assert {"harmful", "benign", "look_dangerous", "contrast_harmful"} == set(ev["category"])
    # Held-out harmful prompts get on-policy answers too; helpful benign answers beat over-refusals.
    samples = [json.loads(line) for line in (small_bench / "onpolicy_responses.jsonl").read_text().splitlines()]
    heldout = {s["split"] for s in samples if s["kind"] == "harmful"}
    assert heldout == {"train", "validation", "test"}
    assert sum(s["split"] == "test" for s in samples) == 2 * manifest["config"]["n_onpolicy_heldout"]
    over = [p for p in pairs if p["source"] == "onpolicy_benign_vs_written_overrefusal"]
    assert over and all(p["chosen_is_safe"] and p["rejected_is_safe"] for p in over)
    from llm_safepref.data.build import WRITTEN_REFUSALS

    assert all(p["rejected"] in WRITTEN_REFUSALS for p in over)
    for row in ev:
        if row["category"] == "benign":
            assert json.loads(row["constraints"])


def test_small_build_has_no_split_leakage(small_bench):
    from llm_safepref.judge import embed

    by_split = {}
    for split in ("train", "validation", "test"):
        prompts = set(load_eval_prompts(str(small_bench), split=split)["prompt"])
        prompts |= set(load_preference_dataset(str(small_bench), split=split)["prompt"])
        by_split[split] = sorted(prompts)
    assert not set(by_split["train"]) & set(by_split["test"])
    assert not set(by_split["train"]) & set(by_split["validation"])
    # No close paraphrase across train/test among harmful prompts (the grouping threshold).
    harm_train = [r["prompt"] for r in load_eval_prompts(str(small_bench), "train") if r["category"] == "harmful"]
    harm_test = [r["prompt"] for r in load_eval_prompts(str(small_bench), "test") if r["category"] == "harmful"]
    sims = embed(harm_test) @ embed(harm_train).T
    manifest = json.loads((small_bench / "manifest.json").read_text())
    assert sims.max() < manifest["config"]["group_threshold"]
    # Benign prompts are split by topic.
    topics = {}
    from llm_safepref.data.benign import load_benign_prompts

    topic_of = {r["prompt"]: r["topic"] for r in load_benign_prompts()}
    for split in ("train", "test"):
        topics[split] = {topic_of[p] for p in load_eval_prompts(str(small_bench), split)["prompt"] if p in topic_of}
    assert not topics["train"] & topics["test"]


def test_missing_local_file(tmp_path):
    with pytest.raises(DataValidationError, match="no such file"):
        load_preference_dataset(str(tmp_path / "absent.jsonl"))


def test_embedded_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SAFEPREF_BENCHMARK_DIR", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="python -m llm_safepref.data build") as err:
        load_preference_dataset("embedded")
    assert str(tmp_path / "nothing") in str(err.value) and "about 16–24 min on a 2-core CPU" in str(err.value)


def test_data_cli_help_and_flag_spellings():
    import subprocess

    for args in (["--help"], ["build", "--help"]):
        out = subprocess.run([sys.executable, "-m", "llm_safepref.data", *args], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert "build" in out.stdout
    assert "--max_minutes" in out.stdout and "--reuse_samples" in out.stdout and "16–24 min" in out.stdout
    from llm_safepref.data.__main__ import build_parser

    kebab = build_parser().parse_args(["build", "--max-minutes", "3", "--n-onpolicy-heldout", "2", "--batch-size", "4"])
    snake = build_parser().parse_args(["build", "--max_minutes", "3", "--n_onpolicy_heldout", "2", "--batch_size", "4"])
    assert kebab == snake and snake.max_minutes == 3.0 and snake.n_onpolicy_heldout == 2 and snake.batch_size == 4


def test_a_build_cut_by_the_time_guard_says_so_and_how_to_complete_it(tiny_model_path, tmp_path):
    """A loaded machine can hit the wall-clock guard: the build must not shrink silently."""
    from fixtures.small_benchmark import SMALL_CONFIG

    from llm_safepref.data import BuildConfig, build_benchmark

    # max_minutes 2.5 puts the sampling deadline at the start (2.5 min are kept for judging and writing).
    cfg = BuildConfig(model=str(tiny_model_path), **{**SMALL_CONFIG, "max_minutes": 2.5})
    with pytest.warns(UserWarning, match="guard.*--reuse_samples"):
        out = build_benchmark(cfg, tmp_path / "cut", force=True)
    assert json.loads((out / "manifest.json").read_text())["truncated"] is True
