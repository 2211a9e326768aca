"""Command line of a trained Safe-CPL policy.

    python -m llm_safepref.methods.safe_cpl generate --model DIR_OR_REPO --prompt TEXT [--prompt TEXT ...]
        [--z 0.1,-0.3,... | --context FILE.jsonl [--context_user ID] [--context_limit K] | --user ID]
    python -m llm_safepref.methods.safe_cpl users --model DIR_OR_REPO

``generate`` conditions on ``--z`` (d comma-separated numbers), on z inferred from a context
file of annotated pairs (JSONL rows with ``prompt`` / ``chosen`` / ``rejected``, the chosen one
preferred by the user), on a training user's z (``--user``), or, with none of them, on the
prior mean. Flags are ``--snake_case`` (``--kebab-case`` accepted). Errors go to stderr with
exit status 1. Offline by default, as every tool of the toolkit: set ``HF_HUB_OFFLINE=0`` to
download a Hub repo id that is not in the Hugging Face cache yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from llm_safepref._runtime import offline_defaults
from llm_safepref.core.cli import ToolParser
from llm_safepref.core.jsonl import read_jsonl

__all__ = ["build_parser", "main", "read_context_file"]


def build_parser() -> ToolParser:
    parser = ToolParser(prog="python -m llm_safepref.methods.safe_cpl",
                        description="Generate with a Safe-CPL policy conditioned on a latent user variable z.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ToolParser)

    gen = sub.add_parser("generate", help="generate completions for prompts, conditioned on z",
                         description="Generate with a Safe-CPL policy. z: --z, --context, --user, or (none) the "
                         "prior mean.")
    gen.add_argument("--model", required=True, help="artefact folder (SafeCPLTrainer.save_artifact) or Hub repo id")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    which = gen.add_mutually_exclusive_group()
    which.add_argument("--z", default=None, help="z as d comma-separated numbers, e.g. 0.5,-1,0,0.2")
    which.add_argument("--context", default=None,
                       help="JSONL file of one user's annotated pairs (prompt, chosen, rejected): z is inferred")
    which.add_argument("--user", default=None, help="a training user's id (the artefact's users.json)")
    gen.add_argument("--context_user", default=None,
                     help="with --context: use only the rows whose user column equals this id")
    gen.add_argument("--context_limit", type=int, default=None, help="with --context: use the first K pairs")
    gen.add_argument("--base_model", default=None, help="base model to use instead of the one the artefact names")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do_sample)")
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --do_sample)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --do_sample)")
    gen.add_argument("--device", default=None, help="torch device (default: CPU)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with z and the completions")

    users = sub.add_parser("users", help="list the training users of an artefact and their z",
                           description="List the training users stored in an artefact's users.json.")
    users.add_argument("--model", required=True, help="artefact folder or Hub repo id")
    return parser


def read_context_file(path: str | Path, *, user: str | None = None, user_column: str = "user_id",
                      limit: int | None = None) -> list[dict]:
    """The pairs of a JSONL context file (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"context file {path} does not exist")
    rows = []
    for number, row in read_jsonl(path):
        if user is not None:
            if user_column not in row:
                raise ValueError(f"{path}, line {number}: no {user_column!r} field to select --context_user {user!r}")
            if str(row[user_column]) != str(user):
                continue
        rows.append(row)
    if user is not None and not rows:
        raise ValueError(f"{path}: no pair of user {user!r} (column {user_column!r})")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--context_limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


def _parse_z(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"--z must be comma-separated numbers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    offline_defaults()  # every tool's defaults; HF_HUB_OFFLINE=0 in the environment to fetch a Hub id
    args = build_parser().parse_args(argv)
    try:
        from llm_safepref.methods.safe_cpl.generate import SafeCPLPolicy

        if args.command == "users":
            from llm_safepref.methods.safe_cpl.artifact import read_users, resolve_artifact

            users = read_users(resolve_artifact(args.model))
            print(json.dumps(users, indent=1))
            return 0
        policy = SafeCPLPolicy.from_pretrained(args.model, base_model=args.base_model, device=args.device)
        context = None
        if args.context is not None:
            context = read_context_file(args.context, user=args.context_user,
                                        user_column=policy.spec.get("user_column", "user_id"),
                                        limit=args.context_limit)
        elif args.context_user is not None or args.context_limit is not None:
            raise ValueError("--context_user / --context_limit need --context FILE.jsonl")
        z_arg = _parse_z(args.z) if args.z is not None else None
        z = policy.resolve_z(1, z=z_arg, context=context, user=args.user)[0]
        completions = policy.generate(args.prompt, z=z, max_new_tokens=args.max_new_tokens,
                                      do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                      seed=args.seed)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    source = ("z" if args.z is not None else "context" if args.context is not None
              else "user" if args.user is not None else "prior_mean")
    if args.json:
        print(json.dumps({"z": z.tolist(), "z_source": source,
                          "completions": [{"prompt": p, "completion": c} for p, c in zip(args.prompt, completions)]},
                         indent=1))
    else:
        print(f"# z ({source}) = {', '.join(f'{v:.4f}' for v in z.tolist())}")
        for p, c in zip(args.prompt, completions):
            print(f"## {p}\n{c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
