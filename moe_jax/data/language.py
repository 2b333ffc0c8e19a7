"""The surface languages of the task world: English and French words for the steps of a worked
solution and for numbers, and the measures R1 §2.3.2 needs — the share of a text's words that are
in a given language, and whether a text mixes languages.

Words are runs of ASCII letters (the char tokenizer's alphabet has no accents, so French is
written without them: "ecris", "verifie"). A word belongs to a language when it is in that
language's lexicon; a word in both lexicons ("six") counts for either, a word in neither counts
for none.
"""

from __future__ import annotations

import re

import numpy as np

LANGUAGES = ("en", "fr")
# How a prompt names the language it wants the reasoning in (appended to the question).
LANGUAGE_NAMES = {"en": "in English", "fr": "en francais"}

# The words a worked solution is written with, by meaning.
STEP_WORDS = {
    "en": {"write": "write", "carry": "carry", "so": "so", "check": "check", "ok": "ok", "wrong": "wrong",
           "again": "again", "try": "try", "no": "no"},
    "fr": {"write": "ecris", "carry": "retenue", "so": "donc", "check": "verifie", "ok": "bon", "wrong": "faux",
           "again": "encore", "try": "essai", "no": "non"},
}

_EN_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
             "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_EN_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_FR_UNITS = ("zero", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze",
             "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf")
# 70..79 and 90..99 are 60 and 80 plus 10..19: soixante-dix, quatre-vingt-dix.
_FR_TENS = ("", "", "vingt", "trente", "quarante", "cinquante", "soixante", "soixante", "quatre-vingt", "quatre-vingt")

_WORD = re.compile(r"[A-Za-z]+")


def _english(n: int) -> str:
    if n >= 100:
        head = f"{_EN_UNITS[n // 100]} hundred"
        return head if n % 100 == 0 else f"{head} {_english(n % 100)}"
    if n < 20:
        return _EN_UNITS[n]
    return _EN_TENS[n // 10] + ("" if n % 10 == 0 else f"-{_EN_UNITS[n % 10]}")


def _french(n: int) -> str:
    """Traditional spelling: "vingt et un", "soixante-douze", "quatre-vingts", "deux cent un"."""
    if n >= 100:
        hundreds, rest = divmod(n, 100)
        head = "cent" if hundreds == 1 else f"{_FR_UNITS[hundreds]} cent" + ("s" if rest == 0 else "")
        return head if rest == 0 else f"{head} {_french(rest)}"
    if n < 20:
        return _FR_UNITS[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix.., quatre-vingt-dix..: the tens of 60 / 80 plus 10..19
        return _FR_TENS[tens] + (" et " if unit == 1 and tens == 7 else "-") + _FR_UNITS[10 + unit]
    if unit == 0:
        return _FR_TENS[tens] + ("s" if tens == 8 else "")
    return _FR_TENS[tens] + (" et " if unit == 1 and tens != 8 else "-") + _FR_UNITS[unit]


def number_words(n: int, language: str) -> str:
    """`n` (0..999) written in words: `number_words(71, "fr") == "soixante et onze"`."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words covers 0..999, got {n}")
    return {"en": _english, "fr": _french}[language](n)


def words(text: str) -> list[str]:
    """The words of a text, lower-cased (runs of ASCII letters; digits and signs separate them)."""
    return [w.lower() for w in _WORD.findall(text)]


def _lexicon(language: str) -> frozenset[str]:
    spelled = " ".join(number_words(n, language) for n in range(1000))
    return frozenset(STEP_WORDS[language].values()) | frozenset(words(spelled)) | frozenset(
        words(LANGUAGE_NAMES[language]))


LEXICONS = {language: _lexicon(language) for language in LANGUAGES}


def language_share(text: str, language: str) -> float:
    """R1's language-consistency measure (§2.3.2): the share of `text`'s words that are words of
    `language`. A text without words has nothing in another language: 1.0."""
    found = words(text)
    if not found:
        return 1.0
    return sum(w in LEXICONS[language] for w in found) / len(found)


def languages_used(text: str) -> set[str]:
    """The languages that have a word in `text` found in no other language's lexicon."""
    used = set()
    for w in set(words(text)):
        owners = [language for language in LANGUAGES if w in LEXICONS[language]]
        if len(owners) == 1:
            used.add(owners[0])
    return used


def mixes_languages(text: str) -> bool:
    """Whether `text` has words that only one language has, of two different languages."""
    return len(languages_used(text)) > 1


def other_language(language: str) -> str:
    return next(other for other in LANGUAGES if other != language)


class Phrasebook:
    """The step words of one solution in `language`, each written in the other language with
    probability `switch_rate` (the language mixing of R1-Zero's traces, at a rate a base corpus
    sets). Draws from `rng` only when `switch_rate` > 0, so a monolingual corpus is unchanged."""

    def __init__(self, language: str, switch_rate: float, rng: np.random.Generator):
        self.language, self.switch_rate, self.rng = language, switch_rate, rng

    def __call__(self, meaning: str) -> str:
        language = self.language
        if self.switch_rate > 0 and self.rng.random() < self.switch_rate:
            language = other_language(language)
        return STEP_WORDS[language][meaning]
