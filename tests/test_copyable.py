"""The paper part of every script copies into another project with torch alone (DESIGN.md, principle 2):
each nn.Module, loss, penalty, noise sampler and kernel, and every function of the script they call,
uses only torch, torchvision and the standard library, never the project's `common` package."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if re.search(r"^SCRIPT = ", p.read_text(), re.M))
PAPER_NAMES = re.compile(r"loss|penalty|noise|mmd|kernel|attention|quantiz|norm", re.I)
ALLOWED_TOP = {"torch", "torchvision", "numpy", "gymnasium", "__future__"} | set(__import__("sys").stdlib_module_names)


def common_uses(tree):
    """For each paper definition of a module: the `common` names it reaches, directly or through helpers."""
    aliases = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "common":
            aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "common"}
    defs = {d.name: d for d in tree.body if isinstance(d, (ast.FunctionDef, ast.ClassDef))}

    def is_module(c):
        return isinstance(c, ast.ClassDef) and any(
            (isinstance(b, ast.Attribute) and b.attr == "Module") or (isinstance(b, ast.Name) and b.id in defs)
            for b in c.bases)
    roots = [n for n, d in defs.items() if is_module(d) or (isinstance(d, ast.FunctionDef) and PAPER_NAMES.search(n))]
    found = {}
    for root in roots:
        todo, seen = [root], set()
        while todo:
            name = todo.pop()
            if name in seen or name not in defs:
                continue
            seen.add(name)
            for node in ast.walk(defs[name]):
                if isinstance(node, ast.Name) and node.id in aliases:
                    found.setdefault(root, set()).add(f"{name} uses {node.id}")
                elif isinstance(node, ast.Name) and node.id in defs:
                    todo.append(node.id)
    return found, roots


def test_the_check_catches_a_model_that_raises_commons_error():
    src = ("from common import run as runlib\nimport torch.nn as nn\n"
           "def depth(n):\n    raise runlib.UsageError('no')\n"
           "class G(nn.Module):\n    def __init__(self):\n        super().__init__(); depth(3)\n")
    found, roots = common_uses(ast.parse(src))
    assert roots == ["G"] and found == {"G": {"depth uses runlib"}}


@pytest.mark.parametrize("script", SCRIPTS)
def test_paper_code_needs_only_torch(script):
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    found, roots = common_uses(tree)
    assert roots, f"{script}.py defines no model or loss?"
    assert not found, f"{script}.py: paper code reaches common: {found}"
    imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    imports |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert imports - ALLOWED_TOP <= {"common"}, f"{script}.py imports {imports - ALLOWED_TOP - {'common'}}"
