"""The floor plan holds: no import cycle between any two of our modules, every folder says what it holds,
git runs and Prefect's client is reached only through their gateways, helper processes start and end through their
one owner, and no file or function outgrows a reading.

import-linter's layers contract (pyproject.toml) orders the folders; it does not see a cycle inside one
folder, which this finds (imports inside functions included: grimp reads them all).
"""

from __future__ import annotations

import ast

import grimp
import networkx as nx

from tests.conftest import ROOT

PACKAGES = ("cli", "flows", "tui")


def nodes_outside(*owners: str):
    """(file, node) for every AST node of our code but the owners' files (paths from the repository root)."""
    for path in [p for name in PACKAGES for p in (ROOT / name).rglob("*.py")]:
        where = str(path.relative_to(ROOT))
        if where not in owners:
            for node in ast.walk(ast.parse(path.read_text())):
                yield where, node


def test_no_import_cycle_between_our_modules():
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    edges = nx.DiGraph()
    for module in graph.modules:
        edges.add_node(module)
        for imported in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    cycles = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert cycles == [], f"modules that import each other, directly or around a ring: {cycles}"


def test_the_cycle_finder_finds_a_ring(tmp_path, monkeypatch):
    """The check above can fail: a two-module ring in a throwaway package is found."""
    package = tmp_path / "ringpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from ringpkg import b\n")
    (package / "b.py").write_text("from ringpkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("ringpkg", include_external_packages=False)
    ring = nx.DiGraph((m, i) for m in graph.modules for i in graph.find_modules_directly_imported_by(m))
    assert [sorted(c) for c in nx.strongly_connected_components(ring) if len(c) > 1] == [["ringpkg.a", "ringpkg.b"]]


def test_every_folder_opens_with_a_docstring():
    folders = [p for name in PACKAGES for p in (ROOT / name).rglob("__init__.py") if "__pycache__" not in p.parts]
    bare = [str(p.relative_to(ROOT)) for p in folders if not ast.get_docstring(ast.parse(p.read_text()))]
    assert bare == [], f"folders without a docstring saying what they hold: {bare}"


def test_git_runs_only_through_its_gateway():
    """Every git command goes through flows/gateways/git.py, which checks its exit status (a list literal or
    call starting with "git" anywhere else is a git subprocess that may not)."""
    found = []
    for where, node in nodes_outside("flows/gateways/git.py"):
        first = node.elts[0] if isinstance(node, (ast.List, ast.Tuple)) and node.elts else None
        if isinstance(first, ast.Constant) and first.value == "git":
            found.append(f"{where}:{node.lineno}")
    assert found == [], f"git run outside flows/gateways/git.py: {found}"


PREFECT_CLIENT_AWAY: set[str] = set()  # none left


def test_prefects_client_is_reached_only_through_its_gateway():
    """Prefect's API client (prefect.client) is imported by flows/gateways/prefect_api.py alone: "end a run", "add
    its tags", "set its labels", "take a slot" each exist once."""
    found = []
    for where, node in nodes_outside("flows/gateways/prefect_api.py", *PREFECT_CLIENT_AWAY):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "prefect.client" or n.startswith("prefect.client.") for n in names):
            found.append(f"{where}:{node.lineno}")
    assert found == [], f"Prefect's client imported outside flows/gateways/prefect_api.py: {found}"


PROCESS_CALLS = {"Popen", "fork", "forkpty", "killpg", "prctl", "setsid"}
PROCESS_KEYWORDS = {"preexec_fn", "start_new_session"}
PROCESSES_AWAY = {
    # a command run to its end, whose output is the answer (not a helper): its gateway's
    "flows/gateways/dvc/cli.py": {"Popen"},
    # the warm server forks each stage it runs (a stage, not a helper); the owner reaps them (processes.Children)
    "flows/stages/warm.py": {"fork"},
}


def test_helper_processes_start_and_end_only_through_their_owner():
    """flows/gateways/processes.py spawns every helper (saying whether it dies with its parent), sets the
    parent-death signal, stops process groups: a Popen, fork, killpg, prctl or preexec_fn elsewhere is a helper it
    does not own (the two named above excepted)."""
    owner = "flows/gateways/processes.py"
    found = []
    for where, node in nodes_outside(owner):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        said = ({name} & PROCESS_CALLS) | ({k.arg for k in node.keywords} & PROCESS_KEYWORDS)
        if said - PROCESSES_AWAY.get(where, set()):
            found.append(f"{where}:{node.lineno} {sorted(said)}")
    assert found == [], f"processes started or ended outside {owner}: {found}"


def test_tunedeck_settings_are_read_only_by_their_model():
    """A TUNEDECK_* variable is named in flows/contracts/settings.py alone (Settings.read at a process's entry, then
    passed down; children get Settings.env()): a string that is such a name anywhere else in our code is a second
    reader or writer of the configuration. Sentences that mention one (`TUNEDECK_SILO_DATA=FOLDER tunedeck ...`)
    are not names."""
    import re

    name = re.compile(r"^TUNEDECK_[A-Z0-9_]+$")
    found = []
    for where, node in nodes_outside("flows/contracts/settings.py"):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and name.match(node.value):
            found.append(f"{where}:{node.lineno} {node.value}")
        if isinstance(node, ast.Attribute) and node.attr == "getenv":
            found.append(f"{where}:{node.lineno} getenv")
    assert found == [], f"TUNEDECK_* variables named outside flows/contracts/settings.py: {found}"


def test_prefects_rest_api_is_reached_through_a_client_its_gateway_makes():
    """A raw HTTP client (httpx.Client, httpx.post/get/...) is made in flows/gateways/prefect_api.py alone (rest()):
    the dashboard, a worker's telemetry and the monitor's events reach the server through one made there."""
    found = []
    for where, node in nodes_outside("flows/gateways/prefect_api.py"):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "httpx"
                and node.func.attr in {"Client", "AsyncClient", "post", "get", "put", "patch", "delete", "request"}):
            found.append(f"{where}:{node.lineno} httpx.{node.func.attr}")
    assert found == [], f"HTTP clients made outside flows/gateways/prefect_api.py: {found}"


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_no_prod_file_or_function_outgrows_a_reading():
    """A file a newcomer reads in one sitting (≤ 400 lines) and a function seen whole on one screen (≤ 60 lines),
    nested functions counted with their parent."""
    too_long = []
    for path in [p for name in PACKAGES for p in (ROOT / name).rglob("*.py")]:
        source = path.read_text()
        where = path.relative_to(ROOT)
        if source.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{where}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == [], f"split these by what they do: {too_long}"
