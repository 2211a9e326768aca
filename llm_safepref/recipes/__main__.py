"""``python -m llm_safepref.recipes [NAME]``: list the recipes' defaults files, or print one.

    python -m llm_safepref.recipes                          # the defaults files and their paths
    python -m llm_safepref.recipes presa_lora > my.yaml     # a copy to edit; then --config my.yaml
"""

from __future__ import annotations

import sys

from llm_safepref.core.cli import ToolParser


def main(argv: list[str] | None = None) -> int:
    from llm_safepref.recipes.defaults import CONFIG_DIR, config_path

    parser = ToolParser(prog="python -m llm_safepref.recipes",
                        description="The recipes' defaults (llm_safepref/recipes/configs/*.yaml): list them, or "
                                    "print one to copy and pass back with --config.")
    parser.add_argument("name", nargs="?", default=None, help="a recipe's defaults to print (e.g. presa_lora)")
    args = parser.parse_args(argv)
    if args.name is None:
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            print(f"{path.stem:<12} {path}")
        return 0
    try:
        path = config_path(args.name)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
