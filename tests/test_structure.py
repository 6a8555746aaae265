"""The outer layer stays small: no public function, method, constructor or ``__call__`` of the package takes
more than 8 parameters (``self`` / ``cls`` not counted), so that settings travel as the typed objects of
``harmon.settings``."""
from __future__ import annotations

import ast
from pathlib import Path

import harmon

PACKAGE = Path(harmon.__file__).resolve().parent
MAX_PARAMETERS = 8


def _public_functions(tree: ast.Module):
    """(qualified name, node) of the module's public functions and the public methods of public classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name in ("__call__", "__init__")):
                    yield f"{node.name}.{item.name}", item


def _parameter_count(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_public_function_takes_more_than_eight_parameters():
    too_many = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, node in _public_functions(tree):
            count = _parameter_count(node)
            if count > MAX_PARAMETERS:
                too_many.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name} ({count})")
    assert not too_many, "public functions with more than 8 parameters:\n" + "\n".join(too_many)


def test_the_count_sees_keyword_only_and_variadic_parameters():
    tree = ast.parse("def f(a, b=1, *args, c, d=2, **kw): pass\nclass K:\n    def m(self, x): pass\n")
    found = dict(_public_functions(tree))
    assert _parameter_count(found["f"]) == 6 and _parameter_count(found["K.m"]) == 1
