"""Mutants of a focal function: the operators, written over `ast`, one mutant per site.

Not taken from a mutation tool. mutmut 3 writes all mutants of a file into one file that its own
runtime selects between, and runs them by forking pytest workers, which the sandbox refuses
(os.fork, subprocess); it has no call that returns one mutant of a source string. cosmic-ray has
one (`mutating.mutate_code`), but it numbers sites over a whole module, has neither the
string-constant nor the statement-deletion operator, and installs a dozen service packages
(aiohttp, sqlalchemy, gitpython, ...) for a parser the standard library already has.

The operators, on the focal function's body only (not its signature, decorators or neighbours):

- comparison: < <=, > >=, == !=, is / is not, in / not in, each swapped for its partner;
- arithmetic (also augmented assignment): + -, * /, // -> *, % -> //, ** -> *, << >>, & |, ^ -> &;
- boolean: and <-> or;
- constant: int/float n -> n + 1, True <-> False, "" -> "x", a non-empty string -> "";
- negate: the condition of if / while / a conditional expression / a comprehension's if -> not;
- drop: a statement (not a docstring, not `pass`) -> pass.

Docstrings and f-strings are left alone. A mutant that does not compile is discarded. When a
function has more than `MUTANT_CAP` sites, `MUTANT_CAP` of them are drawn with `MUTANT_SEED`, so
every method is scored on the same mutants of a function. Equivalent mutants (a change that no
input can tell apart) are not detected; they lower every method's score alike.
"""
from __future__ import annotations

import ast
import random
from dataclasses import dataclass
from typing import Any

from ..errors import LeantuneError

MUTANT_CAP = 30
MUTANT_SEED = 0


def focal_node(module: ast.Module, entry_point: str) -> ast.FunctionDef:
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            return node
    raise LeantuneError(f"the function source defines no top-level function '{entry_point}'")


COMPARISONS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
               ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
ARITHMETIC = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
              ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
              ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitAnd}
BOOLEAN = {ast.And: ast.Or, ast.Or: ast.And}
_UNCHANGED = object()


@dataclass(frozen=True)
class Site:
    operator: str  # comparison, arithmetic, boolean, constant, negate, drop
    line: int  # first line of the enclosing statement: the line coverage reports as executed
    description: str


@dataclass(frozen=True)
class Mutant:
    index: int  # the site's position among all of the function's sites
    site: Site
    source: str  # the whole module, the focal function mutated


def _changed_constant(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return "" if value else "x"
    return _UNCHANGED


def _docstrings(function: ast.AST) -> set[int]:
    """ids of the docstring statements of the function and of anything defined inside it."""
    found = set()
    for node in ast.walk(function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                found.add(id(first))
    return found


class _Mutator(ast.NodeTransformer):
    """Walks the focal function's body, records every mutation site in visiting order, and applies
    the one numbered `target` (-1: none). The walk is the same in every pass, so numbers agree."""

    def __init__(self, target: int, skip: set[int]):
        self.target, self.skip = target, skip
        self.sites: list[Site] = []
        self.line = 0

    def _site(self, operator: str, description: str) -> bool:
        self.sites.append(Site(operator, self.line, description))
        return len(self.sites) - 1 == self.target

    def visit(self, node: ast.AST) -> Any:
        if not isinstance(node, (ast.stmt, ast.excepthandler)):
            return super().visit(node)
        if id(node) in self.skip:
            return node
        outer, self.line = self.line, node.lineno
        try:
            if isinstance(node, ast.stmt) and not isinstance(node, ast.Pass) \
                    and self._site("drop", f"{type(node).__name__} -> pass"):
                return ast.copy_location(ast.Pass(), node)
            return super().visit(node)
        finally:
            self.line = outer

    def _swap(self, node: ast.AST, field: str, table: dict, operator: str) -> None:
        old = getattr(node, field)
        new = table.get(type(old))
        if new is not None and self._site(operator, f"{type(old).__name__} -> {new.__name__}"):
            setattr(node, field, new())

    def _negate(self, node: ast.AST) -> None:
        if self._site("negate", f"{type(node).__name__} condition -> not"):
            node.test = ast.UnaryOp(ast.Not(), node.test)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        for position, old in enumerate(node.ops):
            new = COMPARISONS.get(type(old))
            if new is not None and self._site("comparison", f"{type(old).__name__} -> {new.__name__}"):
                node.ops[position] = new()
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self._swap(node, "op", ARITHMETIC, "arithmetic")
        return self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self._swap(node, "op", ARITHMETIC, "arithmetic")
        return self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self._swap(node, "op", BOOLEAN, "boolean")
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        new = _changed_constant(node.value)
        if new is not _UNCHANGED and self._site("constant", f"{node.value!r} -> {new!r}"):
            return ast.copy_location(ast.Constant(new), node)
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return node

    def visit_If(self, node: ast.AST) -> ast.AST:
        self._negate(node)
        return self.generic_visit(node)

    visit_While = visit_IfExp = visit_If

    def visit_comprehension(self, node: ast.comprehension) -> ast.AST:
        for position, condition in enumerate(node.ifs):
            if self._site("negate", "comprehension if -> not"):
                node.ifs[position] = ast.UnaryOp(ast.Not(), condition)
        return self.generic_visit(node)

    def run(self, function: ast.FunctionDef) -> None:
        function.body = [self.visit(statement) for statement in function.body]


def _walk(module_source: str, entry_point: str, target: int) -> tuple[ast.Module, list[Site]]:
    module = ast.parse(module_source)
    function = focal_node(module, entry_point)
    mutator = _Mutator(target, _docstrings(function))
    mutator.run(function)
    return module, mutator.sites


def mutation_sites(module_source: str, entry_point: str) -> list[Site]:
    return _walk(module_source, entry_point, -1)[1]


def _compiles(source: str) -> bool:
    try:
        compile(source, "mutant.py", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def mutants(module_source: str, entry_point: str, cap: int = MUTANT_CAP, seed: int = MUTANT_SEED) -> list[Mutant]:
    """One mutant per site of the focal function, at most `cap` (drawn with `seed`), in site order."""
    sites = mutation_sites(module_source, entry_point)
    chosen = sorted(random.Random(seed).sample(range(len(sites)), cap)) if len(sites) > cap else range(len(sites))
    found = []
    for index in chosen:
        module, _ = _walk(module_source, entry_point, index)
        source = ast.unparse(ast.fix_missing_locations(module))
        if _compiles(source):
            found.append(Mutant(index, sites[index], source))
    return found
