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
    assert a == assign_splits(keys, (0.7, 0.1, 0.2), seed=0)
    assert a != assign_splits(keys, (0.7, 0.1, 0.2), seed=1)
    for g in set(keys):
        assert len({s for k, s in zip(keys, a) if k == g}) == 1
    frac = {s: a.count(s) / len(a) for s in ("train", "validation", "test")}
    assert abs(frac["train"] - 0.7) < 0.05 and abs(frac["test"] - 0.2) < 0.05


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
    pairs = load_preference_dataset(str(small_bench), split="train")
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected", "chosen_is_safe", "rejected_is_safe", "source"}
    assert all(isinstance(v, bool) for v in pairs["chosen_is_safe"])
    conv = load_preference_dataset(str(small_bench), split="train", conversational=True)
    assert conv[0]["chosen"][0]["role"] == "assistant"
    labels = load_safety_labels(str(small_bench), split="train")
    assert {"prompt", "completion", "is_safe"} <= set(labels.column_names)
    assert set(labels["is_safe"]) == {True, False}
    ev = load_eval_prompts(str(small_bench), split="test")
    assert {"harmful", "benign", "look_dangerous"} == set(ev["category"])
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
    with pytest.raises(FileNotFoundError, match="python -m llm_safepref.data build"):
        load_preference_dataset("embedded")
