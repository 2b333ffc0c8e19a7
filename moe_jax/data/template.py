"""The R1-Zero conversation template and strict parsing of `<think>…</think><answer>…</answer>`.

DeepSeek-R1 Table 1 gives the template; `compact` keeps the same response format with a short
prompt, for character-level toy models whose context is a few hundred tokens.
"""

from __future__ import annotations

import dataclasses
import re

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"

TEMPLATES = {
    "r1_zero": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
        "process here </think> <answer> answer here </answer>. User: {question}. Assistant:"),
    "compact": "{question}\n",
}

# Exactly one think block then one answer block; neither may contain a tag. Whitespace between
# and around the blocks is allowed, nothing else.
_TAG = r"</?(?:think|answer)>"
_FORMAT = re.compile(
    rf"\s*<think>(?P<think>(?:(?!{_TAG}).)*)</think>\s*<answer>(?P<answer>(?:(?!{_TAG}).)*)</answer>\s*",
    re.DOTALL)


def format_prompt(question: str, template: str = "r1_zero") -> str:
    """The prompt the policy continues (its completion should start with `<think>`)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template].format(question=question)


def format_response(thinking: str, answer: str) -> str:
    """A completion in the required format."""
    return f"{THINK_OPEN}{thinking}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
    format_ok: bool
    thinking: str | None
    answer: str | None


def parse_completion(text: str) -> ParsedCompletion:
    """Split a completion into its thinking and answer; `format_ok` only for an exact match of
    the template (one think block, then one answer block, nothing else)."""
    match = _FORMAT.fullmatch(text)
    if match is None:
        return ParsedCompletion(False, None, None)
    return ParsedCompletion(True, match["think"], match["answer"].strip())
