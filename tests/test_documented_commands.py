"""Every command the README, docs/ and the scripts' docstrings give is one its script's parser accepts: a flag
renamed or dropped in a script, but still documented, fails here. Placeholders are filled in (seed S → 0, the
digits M → mnist, an --input PATH → an existing folder); --cuda is parsed as if a GPU were there."""
import ast
import re
import shlex

import pytest
import torch

from tests.conftest import ROOT
from tests.test_bad_input import SCRIPTS

PLACEHOLDERS = {"S": "0", "M": "mnist", "stacked:M": "stacked:mnist"}


def code_in(path):
    """The code a file shows: a markdown file's fenced blocks and inline spans (which may break across lines),
    a script's docstring; backslash-continued lines joined."""
    text = path.read_text()
    if path.suffix == ".py":
        return [ast.get_docstring(ast.parse(text)).replace("\\\n", " ")]
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [block.replace("\\\n", " ") for block in fenced] + [span.replace("\n", " ") for span in inline]


def documented_commands():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *(ROOT / f"{s}.py" for s in SCRIPTS)]
    found = []
    for path in files:
        for code in code_in(path):
            for line in code.splitlines():
                for m in re.finditer(r"python (\w+)\.py((?:(?! python )[^#|])*)", line):
                    if m.group(1) in SCRIPTS:
                        found.append((path.name, m.group(1), m.group(2).strip()))
    return found


COMMANDS = documented_commands()


def test_the_documents_give_commands_for_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    assert len(COMMANDS) > 100


@pytest.mark.parametrize("where,script,flags", COMMANDS, ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, script, flags, tmp_path, monkeypatch):
    import importlib
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", flags)) if a != "..."]
    if "--input" in argv:
        argv[argv.index("--input") + 1] = str(tmp_path)
    importlib.import_module(script).parse_args(argv)
