"""The architecture, enforced on the source (docs/ARCHITECTURE.md): which wing may import which, that only the CLI
prints, exits or imports typer/rich, that only the source wing talks to the Hub, that the pure modules do no I/O,
and that outside layouts/ only the CLI's options name a layout."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fp8q"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__main__.py",))
IDS = [p.relative_to(PACKAGE).as_posix() for p in MODULES]
# fp8q/*.py beside the wings, which any wing may use
SHARED = {"errors", "events", "dtypes", "units", "cores", "version"}
# Each wing's module may import these wings (and the shared modules); see docs/ARCHITECTURE.md.
MAY_IMPORT = {
    "cli": {"cli", "engine", "layouts"},  # engine.api alone: test_the_cli_reaches_the_engine_through_its_api_alone
    "engine": {"engine", "plan", "models", "layouts", "source", "output", "verification"},
    "plan": {"plan", "models", "layouts", "source"},
    "verification": {"verification", "plan", "models", "layouts", "source"},
    "output": {"output", "plan", "layouts", "source"},
    "layouts": {"layouts", "models", "source"},
    "models": {"models", "source"},
    "source": {"source"},
    "errors": set(),
    "dtypes": set(),
    "units": set(),
    "cores": set(),
    "version": set(),
    "events": {"plan"},
    "__init__": {"engine", "layouts", "verification"},  # the lazy public API
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(
                alias.name if alias.name.startswith("fp8q") else alias.name.split(".")[0] for alias in node.names
            )
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0] if not node.module.startswith("fp8q") else node.module)
    return names


def _wing(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _calls(path: Path) -> set[str]:
    return {
        node.func.id
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_module_boundaries(path):
    imports = _imports(path)
    wing = _wing(path)
    if wing != "cli":
        assert not imports & {"typer", "rich", "click"}, f"{path.name}: only the CLI renders"
        assert "print" not in _calls(path) and "exit" not in _calls(path), f"{path.name}: the library never prints"
    if wing != "source" and path.name not in ("publish.py", "repo_target.py"):
        assert not imports & {"huggingface_hub", "httpx"}, (
            f"{path.name}: only source/, output/publish.py and output/repo_target.py use the Hub"
        )
    if path.name in ("numerics.py", "planner.py", "selection.py", "linear.py", "experts.py", "granularity.py"):
        assert not imports & {"os", "shutil", "subprocess", "socket"}, f"{path.name} must stay free of I/O"


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_wings_import_only_what_the_architecture_allows(path):
    wing = _wing(path)
    allowed = MAY_IMPORT[wing] | SHARED | {wing}
    used = {name.split(".")[1] for name in _imports(path) if name.startswith("fp8q.")}
    assert used <= allowed, (
        f"{path.relative_to(PACKAGE)} imports {sorted(used - allowed)}; it may import {sorted(allowed)}"
    )


def test_only_the_cli_names_a_layout_outside_layouts():
    member = re.compile(r"\b(Scheme|Format|ScaleFormat)\.[A-Z_]+\b")
    naming = sorted(p.relative_to(PACKAGE).as_posix() for p in MODULES if member.search(p.read_text()))
    outside = [name for name in naming if not name.startswith("layouts/")]
    # The options' defaults: the engine's (typed Options) and the CLI's (typer's signatures, read before torch is).
    assert outside == ["cli/commands.py", "engine/options.py"], outside


# A module's docstring says what it imports in a sentence starting "Imports:", naming fp8q's modules by file
# name (`checkpoint`), dotted path (`layouts.base`) or wing (`plan`), and third-party packages by their names.
THIRD_PARTY = {
    "torch": "torch",
    "typer": "typer",
    "rich": "rich",
    "yaml": "PyYAML",
    "httpx": "httpx",
    "huggingface_hub": "huggingface_hub",
    "compressed_tensors": "compressed-tensors",
}
WINGS = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
STEMS = {p.stem for p in MODULES if p.stem != "__init__"}


def _declared(path: Path) -> set[str] | None:
    """The names the docstring's Imports sentence lists, or None without one. The sentence is a list (commas,
    semicolons, "and"); each item starts with a module's or a package's name, words after it and in parentheses
    are free ("nothing" alone says it imports nothing but the standard library)."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    if "Imports:" not in doc:
        return None
    sentence = re.split(r"\.(?:\s|$)", doc.split("Imports:", 1)[1], maxsplit=1)[0]
    known = STEMS | WINGS | set(THIRD_PARTY.values()) | {f"{w}.{s}" for w in WINGS for s in STEMS}

    # "layouts (base, detect)" lists layouts.base and layouts.detect; "plan (types)" the plan wing as a whole.
    def listed(m: re.Match[str]) -> str:
        stems = [w for w in re.findall(r"\w+", m[2]) if (PACKAGE / m[1] / f"{w}.py").exists()]
        return ", ".join(f"{m[1]}.{stem}" for stem in stems) or m[1]

    sentence = re.sub(rf"\b({'|'.join(WINGS)}) \(([^)]*)\)", listed, sentence)
    names = set()
    for item in re.split(r",|;|\band\b", re.sub(r"\([^)]*\)", "", sentence)):
        if item.strip() and item.split()[0] != "nothing":
            first = item.split()[0]
            assert first in known, f"{path.name}: 'Imports:' lists {item.strip()!r}, which names no module"
            names.add(first)
    return names


def _imported(path: Path) -> set[str]:
    """The fp8q modules (as wing.stem, or the shared stem) and third-party packages a module imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fp8q.layouts import numerics` imports the module fp8q.layouts.numerics
            folder = PACKAGE.joinpath(*node.module.split(".")[1:])
            names = [
                f"{node.module}.{a.name}"
                if node.module == "fp8q" or (folder / f"{a.name}.py").exists()
                else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            top, *rest = name.split(".")
            if top in THIRD_PARTY:
                found.add(THIRD_PARTY[top])
            elif top == "fp8q" and rest:
                found.add(".".join(rest[:2]))
    return found


def _covers(word: str, module: str) -> bool:
    """Whether a docstring's word names this imported module (itself, its file name, or its wing)."""
    wing, _, stem = module.rpartition(".")
    return word in (module, stem or module, wing) and word != ""


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_docstrings_say_what_the_module_imports(path):
    imported = _imported(path)
    declared = _declared(path)
    name = path.relative_to(PACKAGE).as_posix()
    if declared is None:
        assert not imported, f"{name}: its docstring needs an 'Imports:' sentence; it imports {sorted(imported)}"
        return
    unsaid = sorted(m for m in imported if not any(_covers(w, m) for w in declared))
    stale = sorted(w for w in declared if not any(_covers(w, m) for m in imported))
    assert not unsaid and not stale, f"{name}: Imports: misses {unsaid}; names {stale}, which it does not import"


@pytest.mark.parametrize("path", [p for p in MODULES if p != PACKAGE / "__init__.py"], ids=IDS[1:])
def test_no_module_imports_from_the_package_s_own_api(path):
    """No arrow up: a module imports other modules (`from fp8q import errors` names one), never what the package's
    __init__ holds (its lazy API, the version), which would tie a wing to the API built on it."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "fp8q":
            for alias in node.names:
                assert (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir(), (
                    f"{path.relative_to(PACKAGE)}: imports {alias.name} from the package; import its module instead"
                )


# The one door: what the CLI may import of fp8q (besides itself), at the top or inside a function.
CLI_DOOR = {"fp8q.engine.api", "fp8q.layouts", "fp8q.layouts.vocabulary", "fp8q.errors", "fp8q.events", "fp8q.units"}
CLI_DOOR |= {"fp8q.version"}


@pytest.mark.parametrize("path", sorted((PACKAGE / "cli").glob("*.py")), ids=lambda p: p.name)
def test_the_cli_reaches_the_engine_through_its_api_alone(path):
    """Every command goes through `fp8q.engine.api` (--dry-run too: `preflight`); the CLI otherwise takes only the
    layouts' words, the errors, the events and the units."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fp8q"):
            module = node.module
            assert module.startswith("fp8q.cli") or module in CLI_DOOR, f"cli/{path.name} imports {module}"


# Where a source's kind may be known: the module that tells SRC apart, and the kinds themselves.
SOURCE_KINDS = {"fp8q.source.hub", "fp8q.source.streaming", "fp8q.source.local"}


def _tells_a_path_apart(node: ast.AST) -> bool:
    """`isinstance(x, Path)` or `isinstance(x, (str, Path))`: a question whose answer is the kind of a source."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"):
        return False
    kinds = node.args[1] if len(node.args) == 2 else None
    names = kinds.elts if isinstance(kinds, ast.Tuple) else [kinds]
    return any(isinstance(n, ast.Name) and n.id == "Path" for n in names)


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_what_a_source_is_is_decided_once(path):
    """Repo or path is decided in `source/opening.py` alone: the engine and verify hold a `Source` and never ask
    what it is (no isinstance of a Path, no import of a kind of source outside source/)."""
    name = path.relative_to(PACKAGE).as_posix()
    tree = ast.parse(path.read_text())
    if name != "source/opening.py":
        asked = [node.lineno for node in ast.walk(tree) if _tells_a_path_apart(node)]
        assert not asked, f"{name}: line {asked[0]} asks whether something is a Path; take a Source (source/base.py)"
    if _wing(path) != "source":
        kinds = sorted(_imports(path) & SOURCE_KINDS)
        assert not kinds, f"{name}: imports {kinds[0]}; open SRC with source.opening.open_source and use the Source"


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_what_a_destination_is_is_decided_once(path):
    """The run holds a list of Destinations (output/destination.py): only engine/destinations.py, which makes them
    from the options, names a kind of them; the engine drives them all alike."""
    name = path.relative_to(PACKAGE).as_posix()
    if _wing(path) == "engine" and name != "engine/destinations.py":
        assert "fp8q.output.publish" not in _imports(path), f"{name}: imports output.publish; use the Destination"
        named = {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}
        assert not named & {"Publisher", "OutFolder"}, f"{name}: names a kind of destination; use the Destination"


def _module_graph() -> dict[str, set[str]]:
    """Each module of fp8q (dotted) -> the fp8q modules it imports, at any level (in a function, for type checking):
    a circle through any of them makes the two modules one. The package's lazy API and __main__ are left out."""
    names = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in MODULES
    }
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fp8q"):
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("fp8q")}
        graph[name] = {m for m in found if m in names and m != name and m != "fp8q"}
    graph.pop("fp8q", None)
    return graph


def test_no_two_modules_import_each_other_by_any_path():
    graph = _module_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                circle = path[path.index(other) :] + [other]
                raise AssertionError(f"a circle: {' -> '.join(circle)}")
            if other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_tests_mirror_the_wings():
    """tests/<wing>/ for each wing of the package, beside e2e/ (whole runs against real libraries), architecture/
    (these rules) and support/ (the factories, the stand-in Hub, the reference code); no test file loose in tests/."""
    tests = PACKAGE.parent / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == WINGS | {"e2e", "architecture", "support"}, sorted(folders)
    for wing in WINGS:
        assert list((tests / wing).glob("test_*.py")), f"tests/{wing}/ holds no test"
    assert not list(tests.glob("test_*.py")), "a test file outside the folders"
