"""Offline crowd preference benchmark for Safe-CPL: simulated users with verifiable goals and one
shared safety standard, annotating on-policy samples of the embedded model.

Public API:

* goals (``goals.py``): ``LengthBand``, ``ListFormat``, ``SummaryFirst``, ``SingleParagraph``,
  ``SecondPerson``, ``EndsWithQuestion``, ``Combination``; each ``score(text) -> [0, 1]``.
* users (``users.py``): ``User`` (``score``, ``goal_score``, ``prefers``), ``CROWD_USERS``,
  ``HELDOUT_USERS``, ``DOWNSTREAM``, ``SAFETY_PENALTY``.
* build (``build.py``): ``CrowdConfig``, ``build_crowd`` / ``python -m llm_safepref.crowd build``,
  ``crowd_dir``, ``is_crowd_built``, ``STYLE_INSTRUCTIONS``.
* loading (``load.py``): ``load_crowd_dataset(name_or_path="embedded", split="train", ...)``.
* context sets (``context.py``): ``draw_context_sets``, ``add_context_sets``, ``context_rows``.

See ``docs/crowd.md`` and ``data_cards/crowd_preferences.md``.
"""

from llm_safepref.crowd.build import (
    CROWD_VERSION,
    STYLE_INSTRUCTIONS,
    CrowdConfig,
    build_crowd,
    crowd_dir,
    is_crowd_built,
)
from llm_safepref.crowd.context import (
    ContextError,
    add_context_sets,
    context_rows,
    draw_context_sets,
    pair_index,
)
from llm_safepref.crowd.goals import (
    Combination,
    EndsWithQuestion,
    Goal,
    LengthBand,
    ListFormat,
    SecondPerson,
    SingleParagraph,
    SummaryFirst,
)
from llm_safepref.crowd.load import CrowdDataError, load_crowd_dataset
from llm_safepref.crowd.users import CROWD_USERS, DOWNSTREAM, HELDOUT_USERS, SAFETY_PENALTY, User, get_user

__all__ = [
    "CROWD_USERS",
    "CROWD_VERSION",
    "Combination",
    "ContextError",
    "CrowdConfig",
    "CrowdDataError",
    "DOWNSTREAM",
    "EndsWithQuestion",
    "Goal",
    "HELDOUT_USERS",
    "LengthBand",
    "ListFormat",
    "SAFETY_PENALTY",
    "STYLE_INSTRUCTIONS",
    "SecondPerson",
    "SingleParagraph",
    "SummaryFirst",
    "User",
    "add_context_sets",
    "build_crowd",
    "context_rows",
    "crowd_dir",
    "draw_context_sets",
    "get_user",
    "is_crowd_built",
    "load_crowd_dataset",
    "pair_index",
]
