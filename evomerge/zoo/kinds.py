"""The zoo kinds: model shape, training steps and task sizes of each."""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.zoo.lora import AdapterSpec

# 2: the quickstart zoo (cross-skill) trains 0.7x the D4b half-build steps (700/420/350).
# 3: a validation split (zoo_arith_{l1,l2}_validation) on held-out pairs no search or test item
#    uses; models, search and test items are unchanged.
FORMAT_VERSION = 3


@dataclass(frozen=True)
class ModelShape:
    """Llama dimensions of every model in a zoo."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 64


@dataclass(frozen=True)
class Phase:
    """One training phase of an expert: its steps, learning rates and the blocks it trains.

    `vocab_lr` None shares `body_lr`, 0.0 freezes the embeddings and lm_head; `blocks` None
    trains every block (and the final norm). `wrong_facts` is the fraction of the phase's
    sentences that are single-digit facts with a wrong result (noisy arithmetic in the text).
    """

    steps: int
    body_lr: float
    vocab_lr: float | None = None
    blocks: tuple[int, ...] | None = None
    wrong_facts: float = 0.0


@dataclass(frozen=True)
class ZooSpec:
    """Everything that differs between zoo kinds.

    `max_threads` caps torch's intra-op threads during the build (restored afterwards);
    None keeps the caller's setting. `expert_a_phases` / `expert_b_phases` replace the D4b
    recipe of that expert (one phase of `expert_*_steps` steps) when set.
    """

    shape: ModelShape
    base_steps: int
    expert_a_steps: int
    expert_b_steps: int
    warmup: int
    n_search: int
    n_test: int
    n_validation: int = 300
    search_pairs: int = 400
    test_pairs: int = 800
    max_threads: int | None = None
    expert_a_phases: tuple[Phase, ...] | None = None
    expert_b_phases: tuple[Phase, ...] | None = None
    adapters: tuple[AdapterSpec, ...] = ()
    """LoRA adapters trained from the base instead of the two full experts (when given)."""


_D4B_SHAPE = ModelShape(hidden=128, layers=4, heads=4, intermediate=512)

# The D4b models are built on at most 2 threads, the setting ZOO_FACTS measured: floating-point
# reductions depend on the thread count, so a fixed cap keeps the weights independent of the
# caller's setting (for callers with 2 or more threads).
KINDS: dict[str, ZooSpec] = {
    # The quickstart zoo: the D4b design at 0.35x its steps (0.7x ZOO_FACTS' 2-minute half build),
    # about 1.7 minutes on 2 CPU cores. Expert A is weaker on the target (0.33-0.39 held-out over
    # seeds 0-2) and a searched merge gains +12 to +20 points over it
    # (benchmarks/results/quickstart_gain.md); the half build took 2.5 minutes for a smaller gain.
    "cross-skill": ZooSpec(
        _D4B_SHAPE, 700, 420, 350, warmup=50, n_search=300, n_test=600, max_threads=2
    ),
    "cross-skill-full": ZooSpec(
        _D4B_SHAPE, 2000, 1200, 1000, warmup=50, n_search=300, n_test=600, max_threads=2
    ),
    # Where layers matter (issue 21; benchmarks/layered_zoo.py measures it): 6 blocks. Expert A
    # learns arithmetic in the middle blocks only (2, 3). Expert B learns L2 in its embeddings,
    # head and outer blocks (0, 1, 4, 5), then its middle blocks drift on L2 text that carries
    # noisy arithmetic (30 % of sentences state a wrong single-digit result), so its middle
    # changes fight A's. One weight per expert cannot take B's vocabulary without B's middle;
    # a per-layer recipe can.
    "layered": ZooSpec(
        ModelShape(hidden=128, layers=6, heads=4, intermediate=512),
        700, 500, 600, warmup=50, n_search=300, n_test=600, max_threads=2,
        expert_a_phases=(Phase(500, body_lr=1e-3, vocab_lr=0.0, blocks=(2, 3)),),
        expert_b_phases=(
            Phase(400, body_lr=1e-4, vocab_lr=3e-3, blocks=(0, 1, 4, 5)),
            Phase(200, body_lr=1e-3, vocab_lr=0.0, blocks=(2, 3), wrong_facts=0.3),
        ),
    ),
    # LoRA adapters as sources (issue 39): the quickstart's base, and six adapters on the zoo's skills
    # instead of two full experts: arithmetic in L1 (two strengths, ranks 8 and 4), L2's vocabulary
    # (an adapter of the embeddings and head only, rank 16), and three body adapters on text: L2 with
    # noisy arithmetic, mixed L1/L2, and L1.
    # The target is still arithmetic asked in L2 (benchmarks/adapter_search.py measures it).
    "adapters": ZooSpec(
        _D4B_SHAPE, 700, 0, 0, warmup=50, n_search=300, n_test=600, max_threads=2,
        adapters=(
            AdapterSpec("arith", "arith", rank=8, steps=400, problem_fraction=0.7),
            AdapterSpec("arith_r4", "arith", rank=4, steps=300, problem_fraction=1.0),
            AdapterSpec("l2", "text", rank=16, steps=400, lr=3e-3, l2_fraction=1.0, targets=("embed_tokens", "lm_head")),
            AdapterSpec("l2_noisy", "text", rank=4, steps=300, l2_fraction=1.0, wrong_facts=0.3),
            AdapterSpec("mixed", "text", rank=8, steps=300, l2_fraction=0.5),
            AdapterSpec("l1", "text", rank=4, steps=300, l2_fraction=0.0),
        ),
    ),
    # For tests: real, loadable, distinct models in seconds; not good ones. Its matrices are
    # too small to gain from intra-op threads, and spinning threads on a busy machine slow
    # it down by orders of magnitude, so it builds on one thread.
    "tiny": ZooSpec(
        ModelShape(hidden=64, layers=2, heads=2, intermediate=128),
        150, 80, 80, warmup=10, n_search=60, n_test=60, n_validation=60, max_threads=1,
    ),
    # For tests of adapter sources: the tiny base and three small adapters, in seconds.
    "tiny-adapters": ZooSpec(
        ModelShape(hidden=64, layers=2, heads=2, intermediate=128),
        150, 0, 0, warmup=10, n_search=60, n_test=60, n_validation=60, max_threads=1,
        adapters=(
            AdapterSpec("arith", "arith", rank=4, steps=40),
            AdapterSpec("l2", "text", rank=2, steps=40, l2_fraction=1.0,
                        targets=("embed_tokens", "q_proj", "v_proj", "down_proj")),
            AdapterSpec("mixed", "text", rank=4, steps=40, l2_fraction=0.5),
        ),
    ),
}


def zoo_spec(kind: str) -> ZooSpec:
    """The spec of `kind`; ValueError naming the known kinds otherwise."""
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown zoo kind {kind!r}; known kinds: {', '.join(KINDS)}") from None
