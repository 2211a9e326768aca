"""The toolkit's command-line convention, for its ``argparse`` tools.

Every flag is ``--snake_case`` (as TRL's and transformers' ``HfArgumentParser`` spell them,
so recipes and tools read alike), and its ``--kebab-case`` spelling is accepted too (as
``HfArgumentParser`` also accepts). :class:`ToolParser` adds the alias for every option;
subcommands inherit it. Every tool answers ``--help``.
"""

from __future__ import annotations

import argparse

__all__ = ["ToolParser"]


class ToolParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that registers ``--a_b`` and ``--a-b`` for every long option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        spelled = list(names)
        for name in names:
            if name.startswith("--"):
                canonical = "--" + name[2:].replace("-", "_")
                for alias in (canonical, "--" + name[2:].replace("_", "-")):
                    if alias not in spelled:
                        spelled.append(alias)
        if spelled and spelled[0].startswith("--") and "dest" not in kwargs:
            kwargs["dest"] = spelled[0][2:].replace("-", "_")
        # The snake_case spelling first, so that --help shows the canonical form.
        spelled.sort(key=lambda n: (not n.startswith("-"), n.startswith("--") and "-" in n[2:]))
        return super().add_argument(*spelled, **kwargs)
