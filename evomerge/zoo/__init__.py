"""The embedded model zoo: a tiny cross-skill zoo where merging pays off, built offline.

A base model in language L1, expert A (arithmetic in L1) and expert B (language L2), all
fine-tuned from the base; the target task is arithmetic asked in L2 (see ZOO_FACTS, design
D4b). `build_zoo` trains them in minutes on CPU, deterministically per kind and seed, and
caches the result; `load_zoo` opens a built zoo from its manifest.

Evaluating with lm-eval (facts for the evaluator author, checked against lm-eval 0.4.13):
- Load the tasks with `TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)`.
- Wrap a model with `HFLM(pretrained=model, tokenizer=tokenizer, ...)`, the tokenizer loaded
  with `AutoTokenizer.from_pretrained(zoo.models[name])`.
- TODO
"""

from evomerge.zoo.build import Zoo, ZooError, build_zoo, load_zoo, zoo_dir
from evomerge.zoo.kinds import FORMAT_VERSION, KINDS

__all__ = ["FORMAT_VERSION", "KINDS", "Zoo", "ZooError", "build_zoo", "load_zoo", "zoo_dir"]
