"""The Safe-CPL recipe: stage 1 on crowd preferences, then stage 2 and the baselines on a new task.

``recipes/safe_cpl_lora.py`` calls :func:`run_safe_cpl_recipe`:

    parse (SafeCPLRecipeArguments, SafeCPLConfig, TRL's ModelConfig; defaults
    llm_safepref/recipes/configs/safe_cpl_lora.yaml) -> check the data, the task, the judge
    -> stage 1 (SafeCPLTrainer, LoRA + latent conditioner) -> save the artefact (+ publish)
    -> downstream: K candidates per test prompt for every method, one choice each
    -> table (console, downstream.json / .md) with 95 % intervals

Design decisions:

* Everything that can be refused is refused before the model trains: the crowd file (user
  column, context-set sizes: checked by the trainer's data preparation, before tokenising),
  the task reward (imported and resolved), the judge, the test prompts. Errors print as
  ``error: ...`` and exit with status 2.
* A user's own crowd file trains with nothing else given: without the embedded crowd there is
  no downstream task and no benchmark, so stage 2 is skipped and the recipe says so and how to
  run it (``--downstream embedded --downstream_task module:function``).
* The baselines that need only the base model's samples (task-only, oracle, RC) share one set
  of K samples per prompt, keyed by :func:`base_candidates_key` (model fingerprint, prompts, K,
  generation settings, judge, task reward, threads, library versions) and read from
  ``cache_root()/safe_cpl_downstream``, then from the copy shipped for the defaults at 2 threads
  (:data:`BASE_CANDIDATES_DIR`, as the PRESA recipe ships its base evaluation), so a second run
  (another seed of Safe-CPL) and the default recipe sample the base model zero times. The
  results file's ``base_candidates`` says which (``user-cache`` / ``shipped`` / ``sampled``).
* The downstream results file keeps every method's per-prompt outcomes, so several seeds can
  be aggregated later with two-level intervals (``scripts/safe_cpl_table.py``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl import ScriptArguments  # noqa: E402

__all__ = ["SafeCPLRecipeArguments", "SafeCPLRecipeRun", "run_safe_cpl_recipe"]

#: The base model's judged K samples for the recipe's defaults at 2 threads, shipped with the package
#: (``base-<key>.json``; produced by the recipe itself, see :func:`base_candidates_key`).
BASE_CANDIDATES_DIR = Path(__file__).resolve().parent / "base_candidates"


def base_candidates_key(model, prompts, *, k: int, max_new_tokens: int, temperature: float, top_p: float,
                        batch_size: int, judge_version, task_reward: str, threads: int | None = None) -> str:
    """The cache key of the base model's judged K samples: everything they depend on and nothing else.

    The model's weights fingerprint, the prompts (ids and texts), K, the generation settings (the batch
    size too: a batch's seed and its padding change the samples), the judge's version, the task reward's
    name, ``torch.get_num_threads()`` and the versions of the libraries between weights and verdicts
    (those of the base evaluation's cache key): a shipped file is read only where it would be reproduced.
    """
    import torch

    from llm_safepref.methods.safe_cpl.downstream import cache_key
    from llm_safepref.methods.safe_cpl.embeddings import model_fingerprint
    from llm_safepref.recipes.base_eval import library_versions_key

    return cache_key("base-candidates-v2", model_fingerprint(model), [p["id"] for p in prompts],
                     [p["prompt"] for p in prompts], k, max_new_tokens, temperature, top_p, batch_size,
                     0,  # the sampling seed (sample_base_candidates' seed=0)
                     judge_version, task_reward, threads if threads is not None else torch.get_num_threads(),
                     library_versions_key())


@dataclass
class SafeCPLRecipeArguments(ScriptArguments):
    """Data, downstream task and table options of the Safe-CPL recipe (TRL's ``ScriptArguments`` plus these)."""

    dataset_name: str | None = field(
        default="embedded",
        metadata={"help": "'embedded' (the toolkit's crowd benchmark), a built crowd folder, or a preference file / "
                          "Hub id with prompt, chosen, rejected and a user id column (--user_column)."},
    )
    conversational: bool = field(
        default=True, metadata={"help": "Present prompts and responses as chat messages (needs a chat template)."})
    crowd_imbalanced: bool = field(
        default=False,
        metadata={"help": "Train on the crowd benchmark's imbalanced file (the length group 8x larger)."})
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    downstream: str = field(
        default="auto",
        metadata={"help": "Stage 2 and the baselines on a new task: 'auto' (on the embedded safety benchmark's test "
                          "prompts when training on the embedded crowd, else skipped), 'embedded', 'none', or a built "
                          "benchmark folder."},
    )
    downstream_task: str = field(
        default="embedded",
        metadata={"help": "The task reward: 'embedded' (the crowd benchmark's downstream goal, "
                          "downstream_concise_you), a simulated user's id, or 'module:function' taking "
                          "(prompt, response) and returning a float."},
    )
    stage1_artifact: str | None = field(
        default=None,
        metadata={"help": "Skip stage 1: load this Safe-CPL artefact (a folder saved by the recipe or "
                          "SafeCPLTrainer.save_artifact, or a Hub id) and run stage 2 and the baselines with it."})
    num_candidates: int = field(default=4, metadata={"help": "K: generations per test prompt for every method."})
    stage2_penalty: float = field(
        default=0.05, metadata={"help": "w of the stage-2 score task_reward - w * ||eps||^2 (task-reward units)."})
    stage2_prior: str = field(
        default="learned",
        metadata={"help": "The Gaussian stage 2 draws z = mu + sigma * eps from: learned (the trained prior p(z)) or "
                          "users (fitted to the training users' posterior means, users.json of the artefact: mean and "
                          "std per dimension, std floored at 0.1). users helps when the learned prior stayed near "
                          "N(0, I) while the users' z moved away from it (a small KL weight)."})
    stage2_methods: list[str] = field(
        default_factory=lambda: ["search", "amortized"],
        metadata={"help": "Stage-2 variants: search (K prior draws), amortized (a high-level policy over eps)."})
    baselines: list[str] = field(
        default_factory=lambda: ["task_only", "oracle", "rc"],
        metadata={"help": "Baselines: task_only, oracle, rc (on the base model's K samples), dpo_pooled (a DPO LoRA "
                          "trained on the pooled crowd, same steps; best-of-K of its samples on the task reward). "
                          "task_only and oracle are needed for the normalisation and always run."})
    personalization: bool = field(
        default=False,
        metadata={"help": "Also measure personalisation: held-out users' goal satisfaction with z inferred from "
                          "--personalization_context of their pairs vs the prior mean (and dpo_pooled when run)."})
    personalization_prompts: int = field(
        default=24, metadata={"help": "Answerable (benign + look-dangerous) test prompts per held-out user."})
    personalization_context: int = field(default=4, metadata={"help": "Pairs of a held-out user that infer its z."})
    rc_weights: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75], metadata={"help": "RC's omega values."})
    reward_model_steps: int = field(default=400, metadata={"help": "Full-batch steps of RC's reward model."})
    amortized_train_prompts: int = field(
        default=48, metadata={"help": "Training prompts (the benchmark's train split) for the amortised policy."})
    amortized_rounds: int = field(default=1, metadata={"help": "Rounds of K draws + advantage-weighted regression."})
    amortized_temperature: float = field(default=0.05, metadata={"help": "AWR temperature (task-reward units)."})
    sample_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of every candidate."})
    sample_top_p: float = field(default=0.95, metadata={"help": "Top-p of every candidate."})
    eval_split: str = field(default="test", metadata={"help": "Split of the benchmark's prompts for the table."})
    eval_limit_per_category: int | None = field(
        default=50, metadata={"help": "At most N prompts per category (harmful, benign, look-dangerous)."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Generation length of every candidate."})
    eval_batch_size: int = field(
        default=16, metadata={"help": "Generation batch size of the base model's and pooled DPO's samples and of "
                                      "greedy answers (it keys the base model's cached / shipped samples)."})
    candidate_batch_size: int = field(
        default=32, metadata={"help": "Generation batch size of the trained models' K candidates (Safe-CPL search "
                                      "and amortised, pooled DPO; decoded with the LoRA merged). 32 rows cost 0.70x "
                                      "the time per row of 16 on the embedded model at 2 CPU threads "
                                      "(docs/safe_cpl.md)."})
    eval_judge: str = field(
        default="packaged",
        metadata={"help": "Judge of harm and refusal: 'packaged', an HF sequence-classification model, or "
                          "'module:function'."},
    )
    results_file: str | None = field(
        default=None, metadata={"help": "Also write the downstream results JSON here (default: "
                                        "<output_dir>/downstream.json)."})
    hub_repo_id: str | None = field(
        default=None, metadata={"help": "Repo to publish the artefact to with --push_to_hub (default: hub_model_id, "
                                        "else the output folder name)."})


class SafeCPLRecipeRun:
    """One run of the recipe; each method is a step of :func:`run_safe_cpl_recipe`."""

    def __init__(self, script_args: SafeCPLRecipeArguments, training_args, model_args):
        self.script_args, self.training_args, self.model_args = script_args, training_args, model_args
        self.push_to_hub, training_args.push_to_hub = bool(training_args.push_to_hub), False
        self._hub_token, training_args.hub_token = training_args.hub_token, None
        self.base_model = model_args.model_name_or_path or "embedded"
        self.output_dir = Path(training_args.output_dir)
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.trainer = self.task_reward = self.judge = self.prompts = None
        self.results: dict[str, Any] | None = None

    @classmethod
    def parse(cls, argv: list[str] | None = None, description: str | None = None) -> "SafeCPLRecipeRun":
        from trl import ModelConfig

        from llm_safepref.methods.safe_cpl import SafeCPLConfig
        from llm_safepref.recipes.arguments import parse_args

        script_args, training_args, model_args = parse_args(
            (SafeCPLRecipeArguments, SafeCPLConfig, ModelConfig), "safe_cpl_lora", argv, description=description)
        return cls(script_args, training_args, model_args)

    @property
    def is_main_process(self) -> bool:
        from accelerate import PartialState

        return PartialState().is_main_process

    def _say(self, text: str) -> None:
        if self.is_main_process:
            print(text, flush=True)

    # ------------------------------------------------------------------ checks

    def prepare(self) -> None:
        from transformers import AutoTokenizer

        from llm_safepref.crowd import load_crowd_dataset
        from llm_safepref.methods.safe_cpl.downstream import load_downstream_prompts
        from llm_safepref.methods.safe_cpl.stage2 import resolve_task_reward
        from llm_safepref.models import resolve_model_name
        from llm_safepref.recipes.evaluation import RecipeError
        from llm_safepref.recipes.run import check_chat_template

        sa, ta = self.script_args, self.training_args
        self.model_path = resolve_model_name(self.base_model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, revision=self.model_args.model_revision)
        check_chat_template(self.tokenizer, self.base_model, sa.conversational)
        self.train_dataset = load_crowd_dataset(sa.dataset_name, split=sa.dataset_train_split,
                                                imbalanced=sa.crowd_imbalanced, user_column=ta.user_column,
                                                conversational=sa.conversational)
        if sa.train_limit is not None:
            self.train_dataset = self.train_dataset.select(range(min(sa.train_limit, len(self.train_dataset))))
        if ta.user_column != "user_id":  # the loader renamed it
            ta.user_column = "user_id"
        downstream = sa.downstream
        if downstream == "auto":
            downstream = "embedded" if sa.dataset_name == "embedded" else "none"
        self.downstream_benchmark = None if downstream == "none" else downstream
        if self.downstream_benchmark is None:
            self.skipped.append(
                "stage 2 and the baselines (no downstream task and no benchmark for this dataset): run them with "
                "--downstream embedded (the toolkit's safety benchmark prompts; or a built benchmark folder) and "
                "--downstream_task embedded|<user id>|module:function")
            return
        unknown = sorted(set(sa.stage2_methods) - {"search", "amortized"})
        bad_baselines = sorted(set(sa.baselines) - {"task_only", "oracle", "rc", "dpo_pooled", "none"})
        if unknown or bad_baselines:
            raise RecipeError(f"unknown --stage2_methods {unknown} / --baselines {bad_baselines}; valid: search, "
                              "amortized / task_only, oracle, rc, dpo_pooled, none")
        if sa.num_candidates < 1:
            raise RecipeError(f"--num_candidates must be >= 1, got {sa.num_candidates}")
        if sa.stage2_prior not in ("learned", "users"):
            raise RecipeError(f"--stage2_prior must be learned or users, got {sa.stage2_prior!r}")
        try:
            self.task_reward = resolve_task_reward(sa.downstream_task)
        except ValueError as err:
            raise RecipeError(f"--downstream_task: {err}") from None
        from llm_safepref.judge import resolve_judge

        self.judge = resolve_judge(sa.eval_judge)
        self.prompts = load_downstream_prompts(self.downstream_benchmark, sa.eval_split,
                                               limit_per_category=sa.eval_limit_per_category)
        if not self.prompts:
            raise RecipeError(f"benchmark {self.downstream_benchmark!r}, split {sa.eval_split!r}: no prompts")
        if "amortized" in sa.stage2_methods:
            self.train_prompts = load_downstream_prompts(self.downstream_benchmark, "train", limit_per_category=None,
                                                         limit=sa.amortized_train_prompts)

    # ------------------------------------------------------------------ stage 1

    def build(self) -> None:
        from trl import get_peft_config

        from llm_safepref.methods.safe_cpl import SafeCPLTrainer
        from llm_safepref.recipes.run import model_init_kwargs

        args = self.training_args
        args.model_init_kwargs = {**model_init_kwargs(self.model_args), **(args.model_init_kwargs or {})}
        peft_config = get_peft_config(self.model_args)
        if peft_config is None:
            from llm_safepref.recipes.evaluation import RecipeError

            raise RecipeError("Safe-CPL trains a LoRA adapter with the latent conditioner: pass --use_peft true")
        t0 = time.time()
        self.trainer = SafeCPLTrainer(self.model_path, args=args, train_dataset=self.train_dataset,
                                      processing_class=self.tokenizer, peft_config=peft_config)
        self.timings["prepare_and_embed_s"] = round(time.time() - t0, 1)

    def train(self) -> None:
        t0 = time.time()
        self.trainer.train(resume_from_checkpoint=self.training_args.resume_from_checkpoint)
        self.timings["stage1_train_s"] = round(time.time() - t0, 1)

    def save(self) -> str:
        name = self.dataset_version()
        repo = self.repo_id() if self.push_to_hub else None
        return self.trainer.save_artifact(str(self.output_dir), dataset_name=name, repo_id=repo)

    def dataset_version(self) -> str:
        """The crowd build's version (``crowd-v2``...) for ``embedded``, else the dataset name or path."""
        if self.script_args.dataset_name != "embedded":
            return str(self.script_args.dataset_name)
        import json

        from llm_safepref.crowd.load import crowd_folder

        try:
            return str(json.loads((crowd_folder() / "manifest.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return "embedded"

    def repo_id(self) -> str:
        return self.script_args.hub_repo_id or self.training_args.hub_model_id or self.output_dir.name

    def publish(self) -> int:
        if not self.push_to_hub or not self.is_main_process:
            return 0
        from llm_safepref.methods.safe_cpl.artifact import publish_artifact
        from llm_safepref.publish import PublishError

        try:
            url = publish_artifact(self.output_dir, self.repo_id(), private=bool(self.training_args.hub_private_repo),
                                   token=self._hub_token)
        except PublishError as err:
            print(f"ERROR: publishing failed: {err} (the artefact stays in {self.output_dir})", file=sys.stderr)
            return 1
        print(f"Published {self.output_dir} to {self.repo_id()}: {url}")
        return 0

    # ------------------------------------------------------------------ stage 2 and the baselines

    def _base_candidates(self):
        """The base model's K samples per test prompt, judged and scored: read from this machine's cache, then
        from the package's shipped copies (:data:`BASE_CANDIDATES_DIR`), else sampled and stored in the cache."""
        from llm_safepref.core.paths import cache_root
        from llm_safepref.methods.safe_cpl.downstream import CandidateSet, judge_candidates, sample_base_candidates
        from llm_safepref.models import load_model_and_tokenizer

        sa = self.script_args
        model, tok = load_model_and_tokenizer(self.model_path)
        key = base_candidates_key(model, self.prompts, k=sa.num_candidates, max_new_tokens=sa.eval_max_new_tokens,
                                  temperature=sa.sample_temperature, top_p=sa.sample_top_p,
                                  batch_size=sa.eval_batch_size, judge_version=self.judge.version,
                                  task_reward=self.task_reward.name)
        path = cache_root() / "safe_cpl_downstream" / f"base-{key}.json"
        for source, candidate in (("user-cache", path), ("shipped", BASE_CANDIDATES_DIR / f"base-{key}.json")):
            if candidate.exists():
                cands = CandidateSet.load(candidate)
                if (cands.meta or {}).get("key") == key:
                    self._say(f"base model's candidates: {source} ({candidate})")
                    self.base_candidates_source = {"source": source, "file": str(candidate), "key": key}
                    return cands
        cands = sample_base_candidates(model, tok, self.prompts, sa.num_candidates,
                                       max_new_tokens=sa.eval_max_new_tokens, batch_size=sa.eval_batch_size,
                                       temperature=sa.sample_temperature, top_p=sa.sample_top_p, seed=0,
                                       progress=self.is_main_process,
                                       draw_cache=lambda j: path.with_name(f"{path.stem}.draw{j}.json"))
        judge_candidates(cands, self.task_reward, self.judge)
        cands.meta = {"method": "base", "model": self.base_model, "key": key}
        cands.save(path)
        self.base_candidates_source = {"source": "sampled", "file": str(path), "key": key}
        return cands

    def _stage2_gaussian(self, policy) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` of stage 2's z = mu + sigma * eps (``--stage2_prior``); recorded in ``self.stage2_prior``."""
        from llm_safepref.methods.safe_cpl.stage2 import users_gaussian
        from llm_safepref.recipes.evaluation import RecipeError

        if self.script_args.stage2_prior == "users":
            if len(policy.users) < 2:
                raise RecipeError(f"--stage2_prior users needs the posterior means of at least 2 training users; the "
                                  f"artefact has {len(policy.users)} (users.json)")
            mu, sigma = users_gaussian(policy.users)
        else:
            prior = policy.conditioner.prior
            mu, sigma = prior.mean.detach().float().cpu(), (0.5 * prior.logvar.detach().float().cpu()).exp()
        self.stage2_prior = {"source": self.script_args.stage2_prior, "mu": [round(float(x), 4) for x in mu],
                             "sigma": [round(float(x), 4) for x in sigma]}
        return mu, sigma

    def _latent_candidates(self, policy, prompts, eps, desc: str):
        """One generation per (prompt, ε_k): ``(N, K, d)`` ε -> a judged :class:`CandidateSet`."""
        from llm_safepref.methods.safe_cpl.downstream import CandidateSet, judge_candidates
        from llm_safepref.methods.safe_cpl.stage2 import compose_z, generate_with_latents

        sa = self.script_args
        mu, sigma = self._stage2_gaussian(policy)
        n, k, d = eps.shape
        z = compose_z(eps.reshape(n * k, d), mu, sigma)
        flat_prompts = [p["prompt"] for p in prompts for _ in range(k)]
        texts = generate_with_latents(policy, flat_prompts, z, max_new_tokens=sa.eval_max_new_tokens,
                                      batch_size=sa.candidate_batch_size, temperature=sa.sample_temperature,
                                      top_p=sa.sample_top_p, seed=self.training_args.seed,
                                      progress=self.is_main_process, desc=desc)
        cands = CandidateSet(list(prompts), [texts[i * k:(i + 1) * k] for i in range(n)], eps=eps.numpy())
        return judge_candidates(cands, self.task_reward, self.judge)

    def downstream(self) -> dict[str, Any] | None:
        """Every method's K candidates and choice on the test prompts; the table."""
        if self.downstream_benchmark is None or not self.is_main_process:
            return None
        import numpy as np
        import torch

        from llm_safepref.methods.safe_cpl import SafeCPLPolicy
        from llm_safepref.methods.safe_cpl.downstream import HARM_PENALTY, choose, method_metrics, outcomes_of, \
            reward_model_scores, train_pooled_reward_model
        from llm_safepref.methods.safe_cpl.stage2 import AmortizedLatentPolicy, penalised_scores, search_epsilons

        sa, seed = self.script_args, self.training_args.seed
        k, w = sa.num_candidates, sa.stage2_penalty
        t0 = time.time()
        base = self._base_candidates()
        self.timings["base_candidates_s"] = round(time.time() - t0, 1)
        outcomes: dict[str, dict] = {}
        extra: dict[str, Any] = {}
        outcomes["task_only"] = outcomes_of(base, choose(base.task_reward))
        outcomes["oracle"] = outcomes_of(base, choose(base.task_reward - HARM_PENALTY * base.is_harmful))

        policy = (SafeCPLPolicy.from_pretrained(sa.stage1_artifact) if self.trainer is None
                  else SafeCPLPolicy.from_trainer(self.trainer))
        policy.model.eval()
        d = policy.latent_dim
        if "rc" in sa.baselines:
            t0 = time.time()
            rm, diag = train_pooled_reward_model(self.train_dataset, policy.embedder, steps=sa.reward_model_steps,
                                                 seed=seed)
            r_hat = reward_model_scores(rm, policy.embedder, base)
            for omega in sa.rc_weights:
                scores = (1 - omega) * base.task_reward + omega * r_hat
                outcomes[f"rc_{omega:g}"] = outcomes_of(base, choose(scores))
            extra["rc_reward_model"] = diag
            self.timings["rc_s"] = round(time.time() - t0, 1)
        if "search" in sa.stage2_methods:
            t0 = time.time()
            eps = search_epsilons([p["id"] for p in self.prompts], k, d, seed=seed)
            cands = self._latent_candidates(policy, self.prompts, eps, "safe_cpl search")
            outcomes["safe_cpl_search"] = outcomes_of(cands, choose(penalised_scores(cands.task_reward, eps, w)))
            self.timings["safe_cpl_search_s"] = round(time.time() - t0, 1)
        if "amortized" in sa.stage2_methods:
            t0 = time.time()
            from llm_safepref.data_checks import text_of

            embed = lambda rows: torch.as_tensor(np.asarray(policy.embedder.embed([text_of(r["prompt"]) for r in rows])),  # noqa: E731
                                                 dtype=torch.float32)
            train_feat, test_feat = embed(self.train_prompts), embed(self.prompts)
            hi = AmortizedLatentPolicy(train_feat.size(1), d)
            hi.set_standardisation(train_feat)
            train_ids = [p["id"] for p in self.train_prompts]
            rounds = []
            for r in range(sa.amortized_rounds):
                draws = (search_epsilons(train_ids, k, d, seed=seed + 7919 * (r + 1)) if r == 0 else
                         hi.sample(train_feat, train_ids, k, seed=seed + 7919 * (r + 1), tag="train"))
                cands = self._latent_candidates(policy, self.train_prompts, draws, f"amortised round {r + 1}")
                scores = penalised_scores(cands.task_reward, draws, w)
                diag = hi.fit(train_feat, draws, scores, temperature=sa.amortized_temperature, seed=seed)
                diag.update(round=r + 1, mean_train_score=round(float(scores.mean()), 4),
                            best_of_k_train_score=round(float(scores.max(1).mean()), 4))
                rounds.append(diag)
            eps = hi.sample(test_feat, [p["id"] for p in self.prompts], k, seed=seed)
            cands = self._latent_candidates(policy, self.prompts, eps, "safe_cpl amortised")
            outcomes["safe_cpl_amortized"] = outcomes_of(cands, choose(penalised_scores(cands.task_reward, eps, w)))
            extra["amortized_policy"] = rounds
            self.timings["safe_cpl_amortized_s"] = round(time.time() - t0, 1)

        dpo_model = None
        if "dpo_pooled" in sa.baselines:
            t0 = time.time()
            from llm_safepref.methods.safe_cpl.downstream import judge_candidates, sample_base_candidates

            dpo_model, dpo_tok, extra["dpo_pooled_training"] = self._train_dpo_pooled()
            cands = sample_base_candidates(dpo_model, dpo_tok, self.prompts, k, max_new_tokens=sa.eval_max_new_tokens,
                                           batch_size=sa.candidate_batch_size, temperature=sa.sample_temperature,
                                           top_p=sa.sample_top_p, seed=seed, progress=self.is_main_process)
            judge_candidates(cands, self.task_reward, self.judge)
            outcomes["dpo_pooled"] = outcomes_of(cands, choose(cands.task_reward))
            self.timings["dpo_pooled_s"] = round(time.time() - t0, 1)
        if sa.personalization:
            t0 = time.time()
            extra["personalization"] = self._personalization(policy, dpo_model)
            self.timings["personalization_s"] = round(time.time() - t0, 1)

        methods = {name: method_metrics([o], oracle=outcomes["oracle"], task_only=outcomes["task_only"], seed=seed)
                   for name, o in outcomes.items()}
        self.results = {"methods": methods, "outcomes": outcomes, **extra}
        return self.results

    def _train_dpo_pooled(self):
        """TRL's DPOTrainer with the same LoRA, steps, batch and learning rate on the pooled crowd (no user id)."""
        from trl import DPOConfig, DPOTrainer, get_peft_config

        ta = self.training_args
        pooled = self.train_dataset.select_columns(["prompt", "chosen", "rejected"])
        config = DPOConfig(output_dir=str(self.output_dir / "dpo_pooled"), max_steps=ta.max_steps,
                           learning_rate=ta.learning_rate, lr_scheduler_type=ta.lr_scheduler_type,
                           warmup_steps=ta.warmup_steps, per_device_train_batch_size=ta.per_device_train_batch_size,
                           gradient_accumulation_steps=ta.gradient_accumulation_steps, max_length=ta.max_length,
                           beta=ta.beta, seed=ta.seed, logging_steps=ta.logging_steps, save_strategy="no",
                           report_to=[], use_cpu=ta.use_cpu, bf16=ta.bf16, fp16=ta.fp16, dataloader_pin_memory=False,
                           model_init_kwargs=ta.model_init_kwargs)
        trainer = DPOTrainer(model=self.model_path, args=config, train_dataset=pooled,
                             processing_class=self.tokenizer, peft_config=get_peft_config(self.model_args))
        t0 = time.time()
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):  # only decoded from now on: one matmul per projection, not three
            model = model.merge_and_unload()
        model.eval()
        logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        info = {"steps": trainer.state.global_step, "beta": ta.beta, "final_train_loss": logs[-1]["loss"] if logs
                else None, "train_s": round(time.time() - t0, 1)}
        return model, self.tokenizer, info

    def _personalization(self, policy, dpo_model) -> dict:
        """Held-out users' goal satisfaction: z inferred from a few of their pairs vs the prior mean (vs dpo_pooled).

        Each held-out user's context is ``personalization_context`` of its validation pairs whose two responses are
        both judged safe (the preference is the user's goal, not safety), on distinct prompts, drawn by a seeded
        hash; the answers are greedy, on the same answerable test prompts for every user and model; the score is
        the user's goal score of the answer (a refusal of an answerable prompt scores the goal's minimum).
        """
        import hashlib

        import numpy as np

        from llm_safepref.core.stats import bootstrap_ci
        from llm_safepref.crowd import load_crowd_dataset
        from llm_safepref.crowd.users import get_user
        from llm_safepref.data.sampling import generate_responses

        sa, seed = self.script_args, self.training_args.seed
        rows = load_crowd_dataset(self.script_args.dataset_name, split="validation", users="heldout")
        answerable = [p for p in self.prompts if p["category"] != "harmful"][: sa.personalization_prompts]
        texts = [p["prompt"] for p in answerable]
        by_user: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("chosen_is_safe", True) and r.get("rejected_is_safe", True):
                by_user.setdefault(r["user_id"], []).append(r)

        def goal_scores(user, answers):
            verdicts = self.judge.judge(texts, answers)
            return [user.goal_score(a, p["category"], v["is_refusal"]) for a, p, v in zip(answers, answerable, verdicts)]

        prior_answers = generate_in_batches(policy, texts, policy.prior_mean(), sa)
        dpo_answers = None
        if dpo_model is not None:
            dpo_answers = [a or "" for a in generate_responses(dpo_model, self.tokenizer, texts,
                                                               max_new_tokens=sa.eval_max_new_tokens,
                                                               batch_size=sa.eval_batch_size, progress=False)]
        per = {"inferred": [], "prior_mean": [], "dpo_pooled": []}
        users_out = {}
        for user_id in sorted(by_user):
            user = get_user(user_id)
            ranked = sorted(by_user[user_id], key=lambda r: hashlib.sha256(f"{seed}|{r['pair_id']}".encode()).hexdigest())
            context, seen = [], set()
            for r in ranked:
                if r["prompt"] not in seen:
                    context.append(r)
                    seen.add(r["prompt"])
                if len(context) == sa.personalization_context:
                    break
            z = policy.infer_z(context)
            inferred = generate_in_batches(policy, texts, z, sa)
            scores = {"inferred": goal_scores(user, inferred), "prior_mean": goal_scores(user, prior_answers)}
            if dpo_answers is not None:
                scores["dpo_pooled"] = goal_scores(user, dpo_answers)
            for key, values in scores.items():
                per[key].extend(values)
            users_out[user_id] = {"z": [round(float(v), 4) for v in z], "context_pairs": [r["pair_id"] for r in context],
                                  **{f"{k}_goal_satisfaction": round(float(np.mean(v)), 4) for k, v in scores.items()}}
        out = {}
        for key, values in per.items():
            if values:
                out[key] = {"goal_satisfaction": round(float(np.mean(values)), 4),
                            "goal_satisfaction_ci": [round(x, 4) for x in bootstrap_ci(values, seed=seed)],
                            "n": len(values), "scores": [round(float(v), 4) for v in values]}
        return {**out, "users": users_out, "n_prompts": len(answerable), "context_size": sa.personalization_context,
                "how": "mean goal score of each held-out user's goal over (user, answerable test prompt); greedy; "
                       "95% percentile bootstrap over (user, prompt) cells"}

    # ------------------------------------------------------------------ outputs

    def write_outputs(self) -> dict[str, Any] | None:
        from llm_safepref.core.provenance import run_record, write_json
        from llm_safepref.judge import judge_identity

        if not self.is_main_process:
            return None
        sa, ta = self.script_args, self.training_args
        state = self.trainer.state if self.trainer is not None else None
        train_logs = [e for e in state.log_history if "loss" in e and "train_runtime" not in e] if state else []
        record = run_record(
            method="safe_cpl", base_model=self.base_model, dataset=sa.dataset_name, dataset_version=self.dataset_version(),
            crowd_imbalanced=sa.crowd_imbalanced, seed=ta.seed, global_step=state.global_step if state else None, stage1_artifact=sa.stage1_artifact,
            final_train_loss=train_logs[-1]["loss"] if train_logs else None,
            downstream_benchmark=self.downstream_benchmark, downstream_task=(
                {"name": self.task_reward.name, "description": self.task_reward.description}
                if self.task_reward else None),
            judge=judge_identity(self.judge) if self.judge is not None else None,
            num_candidates=sa.num_candidates, stage2_penalty=sa.stage2_penalty, eval_split=sa.eval_split,
            stage2_prior=getattr(self, "stage2_prior", None),
            n_prompts=len(self.prompts) if self.prompts else 0,
            generation={"max_new_tokens": sa.eval_max_new_tokens, "temperature": sa.sample_temperature,
                        "top_p": sa.sample_top_p, "batch_size": sa.eval_batch_size,
                        "candidate_batch_size": sa.candidate_batch_size, "candidates_merged_adapter": True},
            skipped=self.skipped, timings_s=self.timings,
            base_candidates=getattr(self, "base_candidates_source", None),
            reference_cache=self.trainer.reference_cache_report() if self.trainer is not None else None,
            **(self.results or {}))
        out = Path(sa.results_file) if sa.results_file else self.output_dir / "downstream.json"
        write_json(out, record)
        if self.results:
            from llm_safepref.methods.safe_cpl.downstream import format_table

            md = out.with_suffix(".md")
            md.write_text(f"# Safe-CPL downstream table\n\n`{record['command']}` ({record['date']}, "
                          f"{record['machine']})\n\n{format_table(self.results['methods'], markdown=True)}\n",
                          encoding="utf-8")
        return record

    def report(self) -> None:
        if not self.is_main_process:
            return
        if self.trainer is not None:
            print(f"\nsafe_cpl stage 1 finished: {self.trainer.state.global_step} steps, artefact in {self.output_dir}")
        else:
            print(f"\nsafe_cpl stage 1 loaded from {self.script_args.stage1_artifact}")
        for line in self.skipped:
            print(f"skipped: {line}")
        if self.results:
            from llm_safepref.methods.safe_cpl.downstream import format_table

            print(format_table(self.results["methods"]))
            print(f"(K = {self.script_args.num_candidates} candidates per prompt; 95 % intervals over prompts: Wilson "
                  "for the rates, bootstrap for the reward and the normalised ratios; normalised reward = "
                  "task_reward / oracle's, normalised cost = harmful_rate / task_only's)")
        print("timings (s): " + ", ".join(f"{k}={v}" for k, v in self.timings.items()))


def generate_in_batches(policy, texts, z, sa) -> list[str]:
    """Greedy answers to ``texts`` with one ``z`` ``(d,)`` for all, in batches of ``eval_batch_size``."""
    out = []
    for start in range(0, len(texts), sa.eval_batch_size):
        out += policy.generate(texts[start:start + sa.eval_batch_size], z=z, max_new_tokens=sa.eval_max_new_tokens)
    return [o.strip() for o in out]


def run_safe_cpl_recipe(argv: list[str] | None = None, description: str | None = None) -> int:
    """Run the recipe on ``argv``; 0: done, 1: trained and saved but publishing failed, 2: refused before training."""
    from accelerate import PartialState

    from llm_safepref.crowd.context import ContextError
    from llm_safepref.crowd.load import CrowdDataError
    from llm_safepref.data import DataValidationError
    from llm_safepref.methods.safe_cpl.data import SafeCPLDataError
    from llm_safepref.recipes.evaluation import RecipeError

    t_start = time.time()
    run = SafeCPLRecipeRun.parse(argv, description)
    try:
        run.prepare()
        if run.script_args.stage1_artifact is None:
            run.build()  # the trainer checks the users and context sets before tokenising
    except (RecipeError, DataValidationError, CrowdDataError, ContextError, SafeCPLDataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = 0
    if run.trainer is not None:
        run.train()
        run.save()
        code = run.publish()
    PartialState().wait_for_everyone()
    t0 = time.time()
    run.downstream()
    if run.results is not None:
        run.timings["downstream_s"] = round(time.time() - t0, 1)
    run.timings["total_s"] = round(time.time() - t_start, 1)
    run.write_outputs()
    run.report()
    PartialState().wait_for_everyone()
    if run.trainer is not None and hasattr(run.trainer, "end"):
        run.trainer.end()
    return code
