"""The codec as a package: its modules import downwards only, and it exports theirs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mailedge.proxy

PACKAGE = Path(mailedge.proxy.__file__).parent
# Each module may import only those before it (bottom first). Underscored ones are private.
LAYERS = (
    "values",
    "errors",
    "_decode",
    "header",
    "_tlv",
    "_v1",
    "_v2",
    "parser",
    "sniff",
    "encoder",
    "build",
    "__init__",
)
PUBLIC = ("parser", "sniff", "encoder", "build", "header", "values", "errors")
# The one import that goes up: ProxyHeader(...) from values, deprecated, calls build_header.
SHIM = ("header", "build")


def codec_imports(module: str) -> list[tuple[str, list[str], bool]]:
    """(codec module imported, names taken from it, whether at module level) of ``module``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module.startswith("mailedge.proxy."):
                target = node.module.removeprefix("mailedge.proxy.")
                names = [alias.name for alias in node.names]
                found.append((target, names, id(node) in top))
            elif node.module == "mailedge.proxy":
                for alias in node.names:
                    found.append((alias.name, [], id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mailedge.proxy."):
                    found.append((alias.name.removeprefix("mailedge.proxy."), [], id(node) in top))
    return found


def test_the_layers_name_every_module() -> None:
    assert sorted(path.stem for path in PACKAGE.glob("*.py")) == sorted(LAYERS)


def test_every_module_imports_only_modules_below_it() -> None:
    for index, module in enumerate(LAYERS):
        for target, _, at_top in codec_imports(module):
            if (module, target) == SHIM:
                assert not at_top, "the deprecation shim's import must stay deferred"
                continue
            assert target in LAYERS[:index], (module, target)
            # Only the shim defers an import: any other would hide a cycle.
            assert at_top, (module, target)


def test_the_shim_is_the_one_upward_import() -> None:
    upward = [
        (module, target)
        for index, module in enumerate(LAYERS)
        for target, _, _ in codec_imports(module)
        if target not in LAYERS[:index]
    ]
    assert upward == [SHIM]


def test_no_module_imports_another_modules_underscore_names() -> None:
    for module in LAYERS:
        for target, names, _ in codec_imports(module):
            # The package exports public modules only.
            assert not (module == "__init__" and target.startswith("_")), target
            assert [name for name in names if name.startswith("_")] == [], (module, target)


def test_the_package_exports_its_public_modules_all() -> None:
    gathered = [
        name for module in PUBLIC for name in sys.modules[f"mailedge.proxy.{module}"].__all__
    ]
    assert sorted(mailedge.proxy.__all__) == sorted(gathered)
    assert len(set(gathered)) == len(gathered)
    for name in mailedge.proxy.__all__:
        assert hasattr(mailedge.proxy, name), name


def test_build_header_is_exported_and_private_modules_are_not() -> None:
    assert "build_header" in mailedge.proxy.__all__
    assert not [name for name in mailedge.proxy.__all__ if name.startswith("_")]


# --- the codec is sans-IO ---------------------------------------------------------------------


def test_importing_the_codec_pulls_in_neither_trio_nor_socket() -> None:
    code = (
        "import sys\n"
        "import mailedge.proxy\n"
        "print(sorted(m for m in ('trio', 'socket', '_socket') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_no_codec_module_imports_trio_or_socket() -> None:
    package = Path(mailedge.proxy.__file__).parent
    for path in package.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for banned in ("import trio", "import socket", "from trio", "from socket"):
            assert banned not in source, (path.name, banned)
