"""The embedded model zoo: a tiny cross-skill zoo where merging pays off, built offline.

A base model in language L1 (with 5 % L2 text), expert A (two-digit arithmetic in L1) and
expert B (language L2), both fine-tuned from the base; the target task is arithmetic asked in
L2 (ZOO_FACTS design D4b). `build_zoo` trains them in minutes on CPU, deterministically per
kind and seed, and caches the result; `load_zoo` opens a built zoo from its manifest.

Tasks (4-way log-likelihood multiple choice, metric `acc`): `zoo.search_tasks` and
`zoo.test_tasks` are the L2 target on disjoint operand pairs; `zoo.other_tasks` are the same
skill in L1 (expert A's own). A document reads `4 5 tepu 2 7 =` and is scored on the choices
`7 2 !`, `1 8 !`, ... (digits and "=" are shared by both languages, words are not).
Each task has a generate_until variant over the same data (`tasks.gen_task_name`:
`zoo_arith_l2_search` -> `zoo_arith_l2_gen_search`, metric `exact_match`): greedy, stopped at
the language's period, scored against the correct choice with whitespace and period ignored.

Evaluating with lm-eval (facts for the evaluator author, checked with lm-eval 0.4.13):
- Index only the zoo's tasks: `TaskManager(include_path=str(zoo.tasks_dir),
  include_defaults=False)`, then `get_task_dict(task_names, task_manager)` once per process.
- `HFLM(pretrained=model, tokenizer=tokenizer, device=..., batch_size=...)` with the tokenizer
  from `AutoTokenizer.from_pretrained(zoo.models[name])`. Leave `add_bos_token` at its default
  (None) or pass True: our tokenizer's post-processor prepends `<bos>` whenever
  add_special_tokens is on, which lm-eval 0.4.13 leaves on by default. Never pass
  `add_bos_token=False`: the models are trained with `<bos>` first, and without it accuracy
  no longer matches (measured). No `prefix_token_id` is needed (contexts are never empty).
- With that, lm-eval's per-choice log-likelihoods equal a bare forward pass over
  `<bos> question choice` (see `evomerge.zoo.score`), and `acc` equals the accuracy the
  manifest records for each model (tests/test_zoo.py checks both).
- lm-eval's HFLM needs the `accelerate` package installed; lm-eval prints "fatal: not a git
  repository" outside a git checkout, which is noise.
"""

from evomerge.zoo.build import Zoo, ZooError, build_zoo, load_zoo, zoo_dir
from evomerge.zoo.kinds import FORMAT_VERSION, KINDS

__all__ = ["FORMAT_VERSION", "KINDS", "Zoo", "ZooError", "build_zoo", "load_zoo", "zoo_dir"]
