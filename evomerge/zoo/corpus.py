"""The zoo's grammar: text sentences, arithmetic problems, and packed training sequences.

Sentences are generated in L1 and relexified into L2 word by word (see `vocab.translate`).
Text mixture (by sentence): subject-verb-object 30 %, noun-colour facts 15 %, quantities 15 %,
counting runs 5 %, single-digit plus/minus facts 15 %, number comparisons 20 %.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from evomerge.zoo.vocab import COLOURS, EQUALS, NOUNS, VERBS, Language, number_words, translate

Operation = Literal["plus", "minus"]
OPERATIONS: tuple[Operation, ...] = ("plus", "minus")

# A world of facts shared by every sentence of one zoo: each noun has one colour.
ColourFacts = dict[str, str]


@dataclass(frozen=True)
class Problem:
    """A two-operand arithmetic problem `a <op> b`; always a >= b so both results are >= 0."""

    a: int
    b: int
    op: Operation

    def result(self) -> int:
        """The correct answer."""
        return self.a + self.b if self.op == "plus" else self.a - self.b

    def other_result(self) -> int:
        """The answer of the other operation on the same operands (a key distractor)."""
        return self.a - self.b if self.op == "plus" else self.a + self.b


def problem_prompt(problem: Problem, language: Language) -> list[str]:
    """The question words, e.g. L1 `4 5 plus 2 7 =` (L2 `4 5 tepu 2 7 =`)."""
    words = number_words(problem.a) + [problem.op] + number_words(problem.b) + [EQUALS]
    return translate(words, language)


def answer_words(value: int, language: Language) -> list[str]:
    """The answer words: digits then the language's period, e.g. L1 `7 2 .`."""
    return translate(number_words(value) + ["."], language)


def make_colour_facts(rng: random.Random) -> ColourFacts:
    """Assign each noun a colour."""
    return {noun: rng.choice(COLOURS) for noun in NOUNS}


def _determiner(rng: random.Random) -> str:
    return rng.choice(("the", "a"))


def _svo(rng: random.Random, facts: ColourFacts) -> list[str]:
    return [_determiner(rng), rng.choice(NOUNS), rng.choice(VERBS),
            _determiner(rng), rng.choice(NOUNS), "."]


def _colour_fact(rng: random.Random, facts: ColourFacts) -> list[str]:
    noun = rng.choice(NOUNS)
    return ["the", noun, "is", facts[noun], "."]


def _quantity(rng: random.Random, facts: ColourFacts) -> list[str]:
    return ["there", "are", *number_words(rng.randint(2, 99)), rng.choice(NOUNS), "."]


def _counting(rng: random.Random, facts: ColourFacts) -> list[str]:
    start, length = rng.randint(0, 95), rng.randint(3, 6)
    run = [word for value in range(start, start + length) for word in number_words(value)]
    return ["count", *run, "."]


def _single_digit_problem(rng: random.Random) -> Problem:
    """A random single-digit plus/minus problem (operands swapped so a minus stays >= 0)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op: Operation = rng.choice(OPERATIONS)
    if op == "minus" and a < b:
        a, b = b, a
    return Problem(a, b, op)


def _digit_fact(rng: random.Random, facts: ColourFacts) -> list[str]:
    problem = _single_digit_problem(rng)
    return problem_prompt(problem, "l1") + answer_words(problem.result(), "l1")


def wrong_digit_fact(rng: random.Random, language: Language) -> list[str]:
    """A single-digit plus/minus fact in `language` whose stated result is wrong (noisy
    arithmetic in a text corpus): any value 0..18 but the correct one."""
    problem = _single_digit_problem(rng)
    wrong = rng.choice([value for value in range(19) if value != problem.result()])
    return problem_prompt(problem, language) + answer_words(wrong, language)


def _comparison(rng: random.Random, facts: ColourFacts) -> list[str]:
    x, y = rng.sample(range(100), 2)
    relation = "more" if x > y else "less"
    return [*number_words(x), "is", relation, "than", *number_words(y), "."]


SentenceMaker = Callable[[random.Random, ColourFacts], list[str]]
TEXT_MIXTURE: tuple[tuple[SentenceMaker, float], ...] = (
    (_svo, 0.30),
    (_colour_fact, 0.15),
    (_quantity, 0.15),
    (_counting, 0.05),
    (_digit_fact, 0.15),
    (_comparison, 0.20),
)


def text_sentence(rng: random.Random, facts: ColourFacts, language: Language) -> list[str]:
    """One sentence of the text mixture in `language`."""
    makers = [maker for maker, _ in TEXT_MIXTURE]
    weights = [weight for _, weight in TEXT_MIXTURE]
    maker = rng.choices(makers, weights=weights)[0]
    return translate(maker(rng, facts), language)


def pack_text(
    rng: random.Random, facts: ColourFacts, language: Language, length: int,
    wrong_facts: float = 0.0,
) -> list[str]:
    """`length` words of consecutive sentences (the last one cut off); with `wrong_facts` > 0,
    that fraction of the sentences are wrong single-digit facts (`wrong_digit_fact`)."""
    words: list[str] = []
    while len(words) < length:
        if wrong_facts and rng.random() < wrong_facts:
            words += wrong_digit_fact(rng, language)
        else:
            words += text_sentence(rng, facts, language)
    return words[:length]


def pack_problems(
    rng: random.Random, problems: Sequence[Problem], language: Language, length: int
) -> tuple[list[str], list[bool]]:
    """`length` words of consecutive solved problems and a mask marking answer words.

    The mask is True on the answer digits and period (the only words trained on); a problem
    cut off at the end keeps its mask on whatever answer words fit.
    """
    words: list[str] = []
    mask: list[bool] = []
    while len(words) < length:
        problem = rng.choice(problems)
        prompt = problem_prompt(problem, language)
        answer = answer_words(problem.result(), language)
        words += prompt + answer
        mask += [False] * len(prompt) + [True] * len(answer)
    return words[:length], mask[:length]
