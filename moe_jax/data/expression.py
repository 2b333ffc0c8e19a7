"""A safe arithmetic-expression evaluator for verifying model answers: a recursive-descent parser
over integers, `+ - * /` (also `× ÷ x`) and parentheses, with exact rational arithmetic. Model text
is parsed, never executed."""

from __future__ import annotations

import re
from fractions import Fraction

_TOKEN = re.compile(r"\s*(?:([0-9]+)|(.))")  # ASCII digits only: int() would also take "٣"
_ALIASES = {"×": "*", "x": "*", "÷": "/"}
MAX_LENGTH = 200  # a verifier input longer than this is rejected outright
MAX_DEPTH = 32  # parentheses nested deeper are rejected (the parser recurses per level)


class ExpressionError(ValueError):
    """The text is not a well-formed expression (or divides by zero)."""


def _tokens(text: str) -> list[str | int]:
    tokens: list[str | int] = []
    for number, symbol in _TOKEN.findall(text.strip()):
        if number:
            tokens.append(int(number))
        elif symbol.strip():
            symbol = _ALIASES.get(symbol, symbol)
            if symbol not in "+-*/()":
                raise ExpressionError(f"unexpected character {symbol!r}")
            tokens.append(symbol)
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := NUMBER | '(' expr ')'   (no unary minus: countdown uses the given numbers)."""

    def __init__(self, tokens: list[str | int]):
        self.tokens, self.pos, self.numbers, self.depth = tokens, 0, [], 0

    def peek(self) -> str | int | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | int | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor()
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            self.numbers.append(token)
            return Fraction(token)
        if token == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr()
            self.depth -= 1
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            return value
        raise ExpressionError(f"expected a number or '(', got {token!r}")


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """The exact value of `text` and the numbers it uses, in order of appearance."""
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression longer than {MAX_LENGTH} characters")
    parser = _Parser(_tokens(text))
    value = parser.expr()
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r} after the expression")
    return value, parser.numbers
