"""Simulated users: one goal each, one shared safety standard.

A user ``u`` with goal ``g_u`` scores a response ``y`` to a prompt ``x`` of category ``c`` as

    s_u(x, y) = g̃_u(x, y) − λ · 1[y unsafe],       λ = SAFETY_PENALTY = 10,

    g̃_u(x, y) = min g_u              if c ∈ {benign, look_dangerous} and y is a refusal,
               = g_u(y)              otherwise,

and prefers ``y_a`` to ``y_b`` iff ``s_u(x, y_a) − s_u(x, y_b) ≥ margin``. "Unsafe" and "refusal"
are the verdicts of the toolkit's judge (``llm_safepref.judge.load_judge()``: ``is_safe``,
``is_refusal``), computed once per response and passed in, never re-derived here.

Design decisions:

* λ = 10 exceeds the range of every goal (``[0, 1]``), so every user ranks every safe answer
  above every unsafe one: the users disagree about style and agree about safety (the premise of
  Safe-CPL: the crowd's skills inherit a shared safety standard).
* On benign and look-dangerous prompts a refusal gets the goal's *minimum*, whatever its text
  (a short written refusal would otherwise be "concise" and win the length goal): a skill that
  refuses answerable requests must never look good to anyone. On harmful prompts a refusal keeps
  its natural goal score (a refusal can still be short, or end with a question), and beats every
  unsafe answer because of λ.
* Crowd users (training) and held-out users (personalisation tests) share goal kinds but never
  parameters; the downstream goal (``DOWNSTREAM``) combines two crowd goals, so no crowd user has
  it but the crowd's skills reach it. All three are fixed here and named in
  ``data_cards/crowd_preferences.md`` before any training.
* The crowd both differs and disagrees: ``structured`` wants lists, ``one_paragraph`` prose; the
  other goals are roughly independent of each other. A single unconditioned policy cannot
  please everyone, which is what a latent user variable is for.
* A user's *group* is its goal kind; the imbalance knob of the build resizes groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_safepref.crowd.goals import (
    Combination,
    Goal,
    LengthBand,
    ListFormat,
    SecondPerson,
    SingleParagraph,
    SummaryFirst,
    goal_from_dict,
)

__all__ = [
    "ANSWERABLE_CATEGORIES",
    "CATEGORIES",
    "CROWD_USERS",
    "DOWNSTREAM",
    "HELDOUT_USERS",
    "SAFETY_PENALTY",
    "User",
    "all_users",
    "get_user",
    "user_from_dict",
]

SAFETY_PENALTY = 10.0
CATEGORIES = ("harmful", "benign", "look_dangerous")
#: Categories where a refusal is an over-refusal (scored the goal's minimum).
ANSWERABLE_CATEGORIES = frozenset({"benign", "look_dangerous"})


@dataclass(frozen=True)
class User:
    """A simulated annotator: ``score`` is the preference utility ``s_u`` of the module docstring."""

    user_id: str
    goal: Goal
    role: str = "crowd"  # "crowd" | "heldout" | "downstream"
    penalty: float = SAFETY_PENALTY

    @property
    def group(self) -> str:
        return self.goal.kind

    def goal_score(self, response: str, category: str, is_refusal: bool) -> float:
        """``g̃_u``: the goal's score, or its minimum for a refusal of an answerable request."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown prompt category {category!r}; expected one of {CATEGORIES}")
        if is_refusal and category in ANSWERABLE_CATEGORIES:
            return self.goal.minimum
        return float(self.goal.score(response))

    def score(self, response: str, category: str, *, is_safe: bool, is_refusal: bool) -> float:
        """``s_u = g̃_u − penalty · 1[unsafe]``."""
        return self.goal_score(response, category, is_refusal) - (0.0 if is_safe else self.penalty)

    def prefers(self, a: dict, b: dict, category: str, margin: float = 0.0) -> bool:
        """Whether ``a`` beats ``b`` by at least ``margin``; ``a``/``b``: ``{"response", "is_safe", "is_refusal"}``."""
        sa = self.score(a["response"], category, is_safe=a["is_safe"], is_refusal=a["is_refusal"])
        sb = self.score(b["response"], category, is_safe=b["is_safe"], is_refusal=b["is_refusal"])
        return sa - sb >= margin and sa > sb

    def to_dict(self) -> dict:
        return {"user_id": self.user_id, "role": self.role, "group": self.group, "penalty": self.penalty,
                "goal": self.goal.to_dict()}


def user_from_dict(data: dict) -> User:
    return User(data["user_id"], goal_from_dict(data["goal"]), role=data.get("role", "crowd"),
                penalty=float(data.get("penalty", SAFETY_PENALTY)))


#: The training crowd: one user per goal kind. ``structured`` and ``one_paragraph`` conflict (lists vs prose).
CROWD_USERS: tuple[User, ...] = (
    User("concise", LengthBand(15, 40)),
    User("structured", ListFormat("any", 3)),
    User("summary_first", SummaryFirst(12)),
    User("second_person", SecondPerson(0.05)),
    User("one_paragraph", SingleParagraph()),
)

#: New users of the crowd's goal kinds with other parameters (personalisation; never in training rows).
HELDOUT_USERS: tuple[User, ...] = (
    User("detailed", LengthBand(45, 90), role="heldout"),
    User("numbered", ListFormat("numbered", 4), role="heldout"),
    User("headline", SummaryFirst(6), role="heldout"),
    User("you_heavy", SecondPerson(0.10), role="heldout"),
)

#: The downstream task: a short answer written to the reader (crowd skills "concise" + "second_person").
DOWNSTREAM = User("downstream_concise_you", Combination((LengthBand(15, 40), SecondPerson(0.05))), role="downstream")


def all_users() -> tuple[User, ...]:
    return CROWD_USERS + HELDOUT_USERS + (DOWNSTREAM,)


def get_user(user_id: str) -> User:
    for u in all_users():
        if u.user_id == user_id:
            return u
    raise KeyError(f"no simulated user {user_id!r}; known: {[u.user_id for u in all_users()]}")
