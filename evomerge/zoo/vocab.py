"""The zoo's two languages and its word-level tokenizer.

L1 is a tiny English-like language of 48 words. L2 relexifies L1: every L1 word has its own
L2 word. Mathematical notation is shared, as Arabic numerals and "=" are shared by Japanese
and English: the digits 0-9 and "=". Numbers are written digit by digit ("4 5" is forty-five).
"""

from __future__ import annotations

from typing import Literal

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

Language = Literal["l1", "l2"]

PAD = "<pad>"
BOS = "<bos>"
UNK = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, UNK)
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
EQUALS = "="
SHARED_SYMBOLS: tuple[str, ...] = (*DIGITS, EQUALS)

FUNCTION_WORDS: tuple[str, ...] = (
    "the", "a", "is", "are", "there", "plus", "minus", "more", "less", "than", "count", ".",
)
NOUNS: tuple[str, ...] = (
    "dog", "cat", "bird", "fish", "horse", "cow", "pig", "sheep",
    "apple", "tree", "car", "ball", "book", "house", "boat", "cup",
)
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
VERBS: tuple[str, ...] = (
    "sees", "likes", "eats", "chases", "finds", "has",
    "wants", "takes", "helps", "hears", "knows", "needs",
)
L1_WORDS: tuple[str, ...] = FUNCTION_WORDS + NOUNS + COLOURS + VERBS

# One invented L2 word per L1 word, in the order of L1_WORDS. The L2 period is "!".
L2_WORDS: tuple[str, ...] = (
    "ko", "na", "wa", "ru", "zo", "tepu", "miso", "kaji", "sube", "yori", "kazo", "!",
    "inu", "neko", "tori", "sakana", "uma", "ushi", "buta", "hitsu",
    "ringo", "kinoki", "kuruma", "tama", "hon", "ie", "fune", "chawa",
    "aka", "ao", "midori", "kiro", "kuro", "shiro", "chairo", "momo",
    "miru", "suku", "taberu", "oikake", "mitsuke", "motsu",
    "hoshi", "toru", "tasuke", "kiku", "shiru", "iru",
)
TO_L2: dict[str, str] = dict(zip(L1_WORDS, L2_WORDS, strict=True))
PERIOD: dict[Language, str] = {"l1": ".", "l2": TO_L2["."]}

VOCABULARY: tuple[str, ...] = SPECIAL_TOKENS + SHARED_SYMBOLS + L1_WORDS + L2_WORDS


def translate(words: list[str], language: Language) -> list[str]:
    """Write an L1 word sequence in `language` (shared symbols stay as they are)."""
    if language == "l1":
        return list(words)
    return [TO_L2.get(word, word) for word in words]


def number_words(value: int) -> list[str]:
    """Write a non-negative integer digit by digit: 45 -> ["4", "5"]."""
    if value < 0:
        raise ValueError(f"the zoo languages have no negative numbers: {value}")
    return list(str(value))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The shared word-level tokenizer: whitespace split, one id per word, `<bos>` prepended.

    `<bos>` doubles as the end-of-sequence token. `encode(text)` (add_special_tokens=True,
    the default) gives `[<bos>, ...words]`; with add_special_tokens=False the words alone.
    """
    vocab = {token: index for index, token in enumerate(VOCABULARY)}
    if len(vocab) != len(VOCABULARY):
        raise ValueError("the zoo vocabulary has duplicate tokens")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
    )
