"""Start-up cost of the command line: building the parser and printing any help loads no torch.

Each check runs in a fresh interpreter (the test process has torch loaded already). Timings are not
asserted here (speed targets live in benchmarks/); what is asserted is the cause of slowness: a module
that imports torch, transformers or peft at its top level.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import lorakit.cli
from lorakit.cli.main import COMMANDS

HEAVY = ("torch", "transformers", "peft", "safetensors", "numpy")


def _run(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_cli_module_imports_torch_at_top_level() -> None:
    # Every module in lorakit/cli, registered or not yet: each imported alone in a fresh interpreter.
    names = [info.name for info in pkgutil.iter_modules(lorakit.cli.__path__)]
    assert "main" in names and "train" in names
    loaded = _run(
        "import importlib, json, sys\n"
        f"names = {names!r}\n"
        "out = {}\n"
        "for name in names:\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module('lorakit.cli.' + name)\n"
        f"    out[name] = sorted(m for m in {HEAVY!r} if m in sys.modules and m not in before)\n"
        "print(json.dumps(out))\n"
    )
    assert {name: heavy for name, heavy in loaded.items() if heavy} == {}


def test_every_help_answers_without_torch() -> None:
    commands = [[], *([name] for name in COMMANDS)]
    result = _run(
        "import contextlib, io, json, sys\n"
        "from lorakit.cli.main import main\n"
        "codes, texts = [], []\n"
        f"for command in {commands!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([*command, '--help'])\n"
        "        except SystemExit as stop:\n"
        "            codes.append(stop.code)\n"
        "    texts.append(out.getvalue())\n"
        f"print(json.dumps({{'codes': codes, 'texts': texts, 'heavy': [m for m in {HEAVY!r} "
        "if m in sys.modules]}))\n"
    )
    assert result["heavy"] == []
    assert result["codes"] == [0] * (len(COMMANDS) + 1)
    assert all(name in result["texts"][0] for name in COMMANDS)  # the top-level help lists every command
    for name, text in zip(COMMANDS, result["texts"][1:], strict=True):
        assert text.startswith(f"usage: lorakit {name}"), text[:80]


def test_import_lorakit_is_lazy_and_public_names_resolve() -> None:
    result = _run(
        "import json, sys\n"
        "import lorakit\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "from lorakit import inject, LoraConfig\n"
        "resolved = {name: getattr(lorakit, name).__module__ for name in lorakit.__all__}\n"
        "print(json.dumps({'heavy': heavy, 'resolved': resolved, 'torch_after': 'torch' in sys.modules,\n"
        "                  'transformers_after': 'transformers' in sys.modules}))\n"
    )
    assert result["heavy"] == []
    assert result["torch_after"]  # the public names are the real ones, loaded on first use
    assert not result["transformers_after"]  # the core API never needs transformers
    assert result["resolved"]["inject"] == "lorakit.model"
    assert result["resolved"]["save_adapter"] == "lorakit.adapter_files"
    assert set(result["resolved"]) == set(lorakit.__all__)


def test_unknown_public_name_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        lorakit.no_such_name  # noqa: B018


def test_the_combine_command_offers_the_library_methods() -> None:
    from lorakit.cli.combine import METHODS as offered
    from lorakit.combine import METHODS

    assert offered == METHODS
