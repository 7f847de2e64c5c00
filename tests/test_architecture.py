"""The package's shape, read from the source with `ast` (no TensorFlow, so fast).

Imports run one way, down the stages: `cli` -> `training` -> `outputs` ->
`model` -> `data`, and the shared modules at the top of `tl_keras/` (`config`,
`errors`, ...) import no stage. Modules and functions stay small enough to
read whole.
"""

import ast
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "tl_keras"
# Each stage may import its own modules and those of the stages after it here.
STAGES = ("cli", "training", "outputs", "model", "data")
# Below every stage: the modules beside the folders, and the package itself.
SHARED = len(STAGES)
SIZED_FOLDERS = ("tl_keras", "experiments", "benchmarks")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80  # of code: a docstring doesn't count


def module_name(path):
    """`tl_keras/data/folder.py` -> `tl_keras.data.folder`; a package's
    `__init__.py` -> the package."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(name):
    """A module's place in the order: its stage's index, or `SHARED`."""
    parts = name.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else SHARED


def imported_modules(name, source, is_package=False):
    """(line, dotted name) of every tl_keras import in `source`, those inside
    functions too; `from tl_keras.x import y` gives `tl_keras.x.y`, which has
    the rank of `tl_keras.x`'s stage whether `y` is a module or a name in it."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                base = ".".join(package[:len(package) - node.level + 1] + [base]).rstrip(".")
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, target) for line, target in found if target.split(".")[0] == "tl_keras"]


def upward_imports(name, source, is_package=False):
    """The imports in module `name`'s `source` that run back up the stages."""
    return [f"{name}, line {line}: imports {target}"
            for line, target in imported_modules(name, source, is_package)
            if rank(target) < rank(name)]


def package_modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_run_down_the_stages():
    upward = []
    for path in package_modules():
        upward += upward_imports(module_name(path), path.read_text(),
                                 path.name == "__init__.py")
    assert not upward, (f"Imports that run back up {' -> '.join(STAGES)} -> shared "
                        f"modules:\n" + "\n".join(upward))


@pytest.mark.parametrize("name, source, upward", [
    # Inside a function, where an import is easy to miss.
    ("tl_keras.model.classifier",
     "def build():\n    from tl_keras.training import recipe\n", True),
    ("tl_keras.errors", "import tl_keras.data.pipeline\n", True),
    ("tl_keras.outputs.export", "from ..training.recipe import PhasePlan\n", True),
    ("tl_keras.training.train", "from tl_keras.outputs import plots\n", False),
    ("tl_keras.data.folder", "from . import image_io\nfrom tl_keras import errors\n", False),
])
def test_the_check_finds_an_upward_import(name, source, upward):
    assert bool(upward_imports(name, source)) == upward


def test_no_import_cycles():
    graph = {}
    for path in package_modules():
        name = module_name(path)
        graph[name] = {target for _, target in
                       imported_modules(name, path.read_text(), path.name == "__init__.py")}
    modules = set(graph)
    # A `from package import name` edge leads to the module `name` if there
    # is one, else to the package.
    edges = {name: {target if target in modules else target.rsplit(".", 1)[0]
                    for target in targets} & modules - {name}
             for name, targets in graph.items()}
    cycle = _find_cycle(edges)
    assert cycle is None, "Import cycle: " + " -> ".join(cycle)


def _find_cycle(edges):
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(edges[name]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(edges):
        cycle = visit(name)
        if cycle:
            return cycle
    return None


def sized_files():
    return sorted(path for folder in SIZED_FOLDERS for path in (REPO_ROOT / folder).rglob("*.py"))


def test_modules_stay_small():
    long = [f"{path.relative_to(REPO_ROOT)}: {count} lines" for path in sized_files()
            if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"Modules over {MAX_MODULE_LINES} lines; split them by job:\n" + \
        "\n".join(long)


def code_lines(function):
    """A function's lines of code: its body from the first statement after the
    docstring to the end of the last."""
    body = function.body
    if (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def test_functions_stay_small():
    long = []
    for path in sized_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and code_lines(node) > MAX_FUNCTION_LINES):
                long.append(f"{path.relative_to(REPO_ROOT)}: {node.name}, "
                            f"{code_lines(node)} lines of code")
    assert not long, (f"Functions over {MAX_FUNCTION_LINES} lines of code; give their "
                      f"steps names:\n" + "\n".join(long))


def test_a_docstring_is_not_code():
    function = ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n\n'
                         '    return a\n').body[0]
    assert code_lines(function) == 3
