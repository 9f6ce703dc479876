"""Shape expressions of a ``.pt2`` file, parsed by a grammar of our own, never evaluated.

A ``torch.export`` program with dynamic dimensions stores each symbolic size as the string
sympy prints for it (``s0``, ``2*s0 + 1``, ``FloorDiv(s53, 2)``, ``Symbol('s77',
positive=True, integer=True)``). torch's loader hands those strings to ``sympy.sympify``,
which runs them as Python with builtins in scope: a file could run any code (a screen of the
string before ``sympify`` was bypassed with keyword arguments smuggling ``exec``/``chr``).
:func:`parse` reads them with this grammar instead and builds the sympy objects with their
constructors, so nothing in the string is ever executed::

    expr    := or
    or      := and ('|' and)*
    and     := not ('&' not)*
    not     := '~' not | compare
    compare := sum (('<' | '<=' | '>' | '>=') sum)?
    sum     := product (('+' | '-') product)*
    product := unary (('*' | '/' | '//' | '%') unary)*
    unary   := ('-' | '+') unary | power
    power   := atom ('**' unary)?
    atom    := INT | FLOAT | NAME | NAME '(' args ')' | '(' expr ')'
    args    := expr (',' expr)*  |  Symbol('NAME' (',' ASSUMPTION '=' True|False)*)

Names are the symbols of the program, plain symbols such as ``s0`` (as sympy makes them),
the constants ``oo``/``zoo``/``nan``/``True``/``False``, and function names from an explicit
table: torch's own size functions (which the loader passes in) and a few of sympy's. There
is no attribute access, no string other than a symbol's name, and bounds on length, depth
and the size of numbers, so a hostile string fails with :class:`SymExprError` instead of
running or exhausting memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import sympy

MAX_LENGTH = 20_000
MAX_DEPTH = 64
MAX_DIGITS = 40
MAX_EXPONENT = 64


def _pow(base: Any, exponent: Any) -> Any:
    if exponent.is_Number and (not exponent.is_Integer or abs(int(exponent)) > MAX_EXPONENT):
        raise SymExprError(f"exponent {exponent} out of range in shape expression")
    if not exponent.is_Number and base.is_Number:
        raise SymExprError("a symbolic exponent of a number in shape expression")
    return sympy.Pow(base, exponent)


SYMPY_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "Add": sympy.Add,
    "Mul": sympy.Mul,
    "Pow": _pow,
    "Max": sympy.Max,
    "Min": sympy.Min,
    "Abs": sympy.Abs,
    "Eq": sympy.Eq,
    "Ne": sympy.Ne,
    "Ge": sympy.Ge,
    "Gt": sympy.Gt,
    "Le": sympy.Le,
    "Lt": sympy.Lt,
    "And": sympy.And,
    "Or": sympy.Or,
    "Not": sympy.Not,
    "floor": sympy.floor,
    "ceiling": sympy.ceiling,
    "Integer": sympy.Integer,
    "Rational": sympy.Rational,
    "Float": sympy.Float,
}
"""sympy functions a shape expression may call (torch's own come from the loader)."""

CONSTANTS: dict[str, Any] = {
    "oo": sympy.oo,
    "zoo": sympy.zoo,
    "nan": sympy.nan,
    "True": sympy.true,
    "False": sympy.false,
    "true": sympy.true,
    "false": sympy.false,
}

ASSUMPTIONS = frozenset(
    {
        "integer",
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "real",
        "finite",
        "extended_real",
        "rational",
        "zero",
        "nonzero",
        "even",
        "odd",
        "prime",
        "composite",
        "commutative",
        "infinite",
    }
)
"""Keyword arguments ``Symbol('s0', ...)`` may carry: sympy's assumption names, values
True/False only."""

_TOKEN = re.compile(
    r"\s*(?:(?P<float>\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)|(?P<int>\d+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<string>'[A-Za-z_][A-Za-z0-9_]*')"
    r"|(?P<op>\*\*|//|<=|>=|==|!=|[-+*/%<>&|~(),=]))"
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SymExprError(ValueError):
    """A shape expression outside the grammar (or its bounds)."""


def parse(
    text: str,
    symbols: Mapping[str, Any] | None = None,
    functions: Mapping[str, Callable[..., Any]] | None = None,
) -> Any:
    """The sympy expression ``text`` denotes, built without evaluating any of it as code.

    Args:
        text: the expression as sympy prints it (e.g. ``"FloorDiv(s0, 2) + 1"``).
        symbols: known names and the sympy objects they stand for (the program's symbols).
        functions: callable names besides :data:`SYMPY_FUNCTIONS` (torch's ``FloorDiv``,
            ``Mod``, ...), each a sympy function class supplied by the caller.

    Raises:
        SymExprError: ``text`` is not in the grammar, or exceeds its bounds.
    """
    if not isinstance(text, str):
        raise SymExprError(f"a shape expression must be a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise SymExprError(f"shape expression of {len(text)} characters (at most {MAX_LENGTH})")
    funcs = {**SYMPY_FUNCTIONS, **(functions or {})}
    return _Parser(_tokens(text), dict(symbols or {}), funcs).run()


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise SymExprError(f"unexpected {text[pos : pos + 10]!r} in shape expression")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens, symbols, functions) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = 0
        self.symbols = symbols
        self.functions = functions

    # -- token helpers ----------------------------------------------------------------------
    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind and tok[0] != kind):
            want = value or kind or "more"
            got = "the end" if tok is None else repr(tok[1])
            raise SymExprError(f"expected {want!r} in shape expression, found {got}")
        self.i += 1
        return tok[1]

    def at(self, *values: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "op" and tok[1] in values

    def run(self) -> Any:
        if not self.tokens:
            raise SymExprError("empty shape expression")
        value = self.expr()
        if self.peek() is not None:
            raise SymExprError(f"unexpected {self.peek()[1]!r} in shape expression")
        return value

    # -- grammar ----------------------------------------------------------------------------
    def expr(self) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise SymExprError(f"shape expression nested deeper than {MAX_DEPTH}")
        try:
            return self.or_()
        finally:
            self.depth -= 1

    def or_(self) -> Any:
        value = self.and_()
        while self.at("|"):
            self.take("|")
            value = sympy.Or(value, self.and_())
        return value

    def and_(self) -> Any:
        value = self.not_()
        while self.at("&"):
            self.take("&")
            value = sympy.And(value, self.not_())
        return value

    def not_(self) -> Any:
        if self.at("~"):
            self.take("~")
            return sympy.Not(self.not_())
        return self.compare()

    def compare(self) -> Any:
        ops = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}
        value = self.sum()
        if self.at(*ops):
            op = self.take()
            value = ops[op](value, self.sum())
        if self.at("==", "!="):
            raise SymExprError("'==' and '!=' are not shape-expression syntax (Eq, Ne are)")
        return value

    def sum(self) -> Any:
        value = self.product()
        while self.at("+", "-"):
            op = self.take()
            rhs = self.product()
            value = value + rhs if op == "+" else value - rhs
        return value

    def product(self) -> Any:
        value = self.unary()
        while self.at("*", "/", "//", "%"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = value * rhs
            elif op == "/":
                value = value / rhs
            elif op == "//":  # Python's operator on sympy objects, as sympify computes it
                value = value // rhs
            else:
                value = sympy.Mod(value, rhs)
        return value

    def unary(self) -> Any:
        if self.at("-", "+"):
            op = self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise SymExprError(f"shape expression nested deeper than {MAX_DEPTH}")
            try:
                value = self.unary()
            finally:
                self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Any:
        base = self.atom()
        if self.at("**"):
            self.take("**")
            return _pow(base, self.unary())
        return base

    def atom(self) -> Any:
        kind, value = self.peek() or ("end", "")
        if kind == "int":
            self.take()
            if len(value) > MAX_DIGITS:
                raise SymExprError(f"integer of {len(value)} digits in shape expression")
            return sympy.Integer(int(value))
        if kind == "float":
            self.take()
            if len(value) > MAX_DIGITS:
                raise SymExprError(f"number of {len(value)} characters in shape expression")
            return sympy.Float(value)
        if kind == "op" and value == "(":
            self.take("(")
            inner = self.expr()
            self.take(")")
            return inner
        if kind == "name":
            self.take()
            if "__" in value:
                raise SymExprError(f"name {value!r} in shape expression")
            if self.at("("):
                return self.call(value)
            if value in self.symbols:
                return self.symbols[value]
            if value in CONSTANTS:
                return CONSTANTS[value]
            if value in self.functions:
                raise SymExprError(f"function {value!r} used without arguments")
            return sympy.Symbol(value)  # an unknown name is a plain symbol, as in sympify
        got = "the end" if kind == "end" else repr(value)
        raise SymExprError(f"expected a number, name or '(' in shape expression, found {got}")

    def call(self, name: str) -> Any:
        self.take("(")
        if name == "Symbol":
            return self.symbol()
        fn = self.functions.get(name)
        if fn is None:
            raise SymExprError(f"unknown function {name!r} in shape expression")
        args = [self.expr()]
        while self.at(","):
            self.take(",")
            args.append(self.expr())
        self.take(")")
        try:
            return fn(*args)
        except SymExprError:
            raise
        except (TypeError, ValueError, ArithmeticError, AttributeError) as e:
            raise SymExprError(f"{name}{tuple(args)} is not a valid shape expression") from e

    def symbol(self) -> Any:
        name = self.take(kind="string")[1:-1]
        assumptions: dict[str, bool] = {}
        while self.at(","):
            self.take(",")
            key = self.take(kind="name")
            if key not in ASSUMPTIONS:
                raise SymExprError(f"Symbol assumption {key!r} is not one of sympy's")
            self.take("=")
            flag = self.take(kind="name")
            if flag not in ("True", "False"):
                raise SymExprError(f"Symbol assumption {key}={flag} must be True or False")
            assumptions[key] = flag == "True"
        self.take(")")
        if not _NAME.fullmatch(name):
            raise SymExprError(f"bad symbol name {name!r}")
        return sympy.Symbol(name, **assumptions)
