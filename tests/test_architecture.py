"""Where code lives: the import rules of ARCHITECTURE.md, and one image loader, checked on the source itself."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import spp_curate

PACKAGE = Path(spp_curate.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every import inside the package (module level and lazy ones in functions), module to module."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.startswith("spp_curate"):
                    targets.add(base)
                    targets.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("spp_curate"))
        modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_curate_and_pairing_never_import_the_trainer():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith(("spp_curate.curate", "spp_curate.pairing", "spp_curate.export", "spp_curate.leakage")):
            wrong = sorted(t for t in targets if t.startswith("spp_curate.train"))
            assert not wrong, f"{module} imports {wrong}"


def test_shared_modules_import_no_stage_or_trainer():
    graph = import_graph()
    shared = ("spp_curate.images", "spp_curate.checkpoint", "spp_curate.layout", "spp_curate.files",
              "spp_curate.errors", "spp_curate.pipeline", "spp_curate.backbones")
    for module in shared:
        wrong = sorted(t for t in graph[module]
                       if t.startswith(("spp_curate.curate", "spp_curate.pairing", "spp_curate.export",
                                        "spp_curate.train", "spp_curate.engine")))
        assert not wrong, f"{module} imports {wrong}"


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = sorted(m for m in import_graph() if "ray_engine" not in m)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_pictures_are_decoded_only_by_the_one_loader():
    pattern = re.compile(r"\b(decode_image|decode_with_format|Image\.open)\(|\.convert\(\"RGB\"\)")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "images.py" and path.parent == PACKAGE:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_between_modules():
    graph = {m: {t for t in ts if not graph_is_package(t)} for m, ts in import_graph().items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def graph_is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def test_engines_import_no_stage_and_stages_import_no_engine():
    graph = import_graph()
    stage_packages = ("spp_curate.curate", "spp_curate.pairing", "spp_curate.export", "spp_curate.leakage")
    for module, targets in graph.items():
        if module.startswith("spp_curate.engine"):
            wrong = sorted(t for t in targets if t.startswith(stage_packages) or t == "spp_curate.stages")
            assert not wrong, f"{module} imports {wrong}"
        if module.startswith(stage_packages):
            wrong = sorted(t for t in targets if t.startswith("spp_curate.engine"))
            assert not wrong, f"{module} imports {wrong}"


def test_review_decisions_are_read_and_written_by_the_store_alone():
    graph = import_graph()
    store = graph["spp_curate.review.store"]
    assert all(not t.startswith(("spp_curate.curate", "spp_curate.pairing", "spp_curate.export", "spp_curate.train",
                                 "spp_curate.stages", "spp_curate.review.server")) for t in store), store
    for module, targets in graph.items():
        if module != "spp_curate.cli":
            assert "spp_curate.review.server" not in targets, f"{module} imports the review server"
    touching = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                if "layout.REVIEWS" in p.read_text()]
    # the stage table watches the file, the server names it to the user; only the store opens it
    assert sorted(touching) == ["pipeline.py", "review/server.py", "review/store.py"], touching


#: Recipe fields a recipe file sets and no option of ``build`` does, each for its reason.
RECIPE_FILE_ONLY = {
    "description": "free text for the dataset card: a recipe file holds it",
    "grid_pairs": "the report's grid size: a recipe file holds it",
    "reviewed": "chosen after a review, with `spp-curate export --reviewed`",
}
#: Options of ``build`` that are not recipe fields: where the build goes and how it runs.
BUILD_ONLY = {"out_dir", "recipe_file", "until", "force", "rehash", "trust_listing"}


def _options(command_name: str) -> dict:
    import typer.main

    from spp_curate.cli import app

    command = typer.main.get_command(app).commands[command_name]
    return {p.name: p for p in command.params}


def test_every_recipe_field_is_one_build_option_of_its_own_name_and_nothing_is_declared_twice():
    from spp_curate.config import Recipe

    build = _options("build")
    fields = set(Recipe.model_fields)
    assert not (fields - set(build) - set(RECIPE_FILE_ONLY)), "recipe fields with no build option"
    assert not (set(build) - fields - BUILD_ONLY), "build options that are no recipe field"
    for name in set(build) & fields:  # the option is spelled as the field
        assert f"--{name.replace('_', '-')}" in build[name].opts, (name, build[name].opts)
    # a stage command that takes a recipe field takes it as build does: the same help, the same bounds
    for stage in ("embed", "export"):
        for name, param in _options(stage).items():
            if name in fields and name in build:
                same = ("help", "opts", "min", "max", "metavar")
                assert [getattr(param, a) for a in same] == [getattr(build[name], a) for a in same], (stage, name)
            elif name in fields:
                assert name in RECIPE_FILE_ONLY, (stage, name)


def test_an_ssl_method_is_one_class_that_names_itself():
    from spp_curate.train.methods import METHODS
    from spp_curate.train.methods.simclr import SimCLR

    assert list(METHODS)[:4] == ["moco", "simclr", "simsiam", "byol"]

    class Wider(SimCLR):
        name = "wider-simclr"

    try:
        assert METHODS["wider-simclr"] is Wider
    finally:
        METHODS.pop("wider-simclr")
