"""Dependencies run one way: the rule, written once, checked on the source of every hepreg module.

Data flows CLI -> stage -> (data, models, cache). Models take tensors and their typed settings
(`hepreg.settings`), never the cache, a stage or a config file (`hepreg.config`), and know the
detector through `hepreg.physics.detector`, never through the generator (`hepreg.data.synthetic`); the cache
knows a schema of tensors, never the model that made them; the HDF5 reader and the synthetic data stay
torch-free; stages never import each other, except the benchmarks, which run stages. The detector model
(`hepreg.physics`) is below the generator, the fits and the heads: it knows the data layout and nothing else.
The run mechanics (`hepreg.runs.directory`) know the config and nothing of data, models or physics; the evaluation
(`hepreg.evaluation`) measures what the models give and runs no stage. Besides the subpackages, the top level
holds only what spans them: the CLI, the settings and the config that reads them, the errors, and the glue between stage 1, cache and head
(flat, frozen, prepared, trained).
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# importer (a module, or every module of a package) -> what it must never import, directly or lazily
FORBIDDEN = {
    "hepreg.models": ("hepreg.cache", "hepreg.stages", "hepreg.frozen", "hepreg.cli", "hepreg.data.synthetic",
                      "hepreg.config"),
    "hepreg.cache": ("hepreg.models", "hepreg.stages", "hepreg.frozen", "hepreg.cli"),
    "hepreg.data": ("hepreg.models", "hepreg.cache", "hepreg.stages", "hepreg.frozen", "hepreg.runs.directory",
                    "hepreg.flat", "hepreg.cli"),
    "hepreg.flat": ("hepreg.models", "hepreg.cache", "hepreg.stages", "hepreg.frozen", "hepreg.runs.directory", "hepreg.cli"),
    "hepreg.frozen": ("hepreg.cache", "hepreg.stages", "hepreg.cli"),
    "hepreg.stages": ("hepreg.stages", "hepreg.cli"),
    "hepreg.physics": ("hepreg.models", "hepreg.cache", "hepreg.stages", "hepreg.frozen", "hepreg.runs.directory",
                       "hepreg.flat", "hepreg.cli", "hepreg.data.synthetic", "hepreg.data.reader",
                       "hepreg.data.batching", "hepreg.data.batch"),
    "hepreg.runs": ("hepreg.data", "hepreg.models", "hepreg.physics", "hepreg.cache", "hepreg.stages",
                    "hepreg.evaluation", "hepreg.flat", "hepreg.frozen", "hepreg.prepared", "hepreg.trained",
                    "hepreg.cli"),
    "hepreg.evaluation": ("hepreg.cache", "hepreg.stages", "hepreg.frozen", "hepreg.cli"),
}
# the top level: these modules and the subpackages, nothing else loose
TOP_LEVEL = {"hepreg", "hepreg.__main__", "hepreg.cli", "hepreg.config", "hepreg.settings", "hepreg.errors",
             "hepreg.flat", "hepreg.frozen", "hepreg.prepared", "hepreg.trained"}
# may break a rule above: the benchmarks run the stages they measure, the tuner trains heads with train-head's loop
EXEMPT = {"hepreg.stages": ("hepreg.stages.bench", "hepreg.stages.bench_export", "hepreg.stages.tune",
                          "hepreg.stages.bench_stream")}
# importing these must not load torch (through module-level imports, followed into hepreg's own modules)
TORCH_FREE = ("hepreg.config", "hepreg.settings", "hepreg.errors", "hepreg.runs.digest", "hepreg.runs.files", "hepreg.data.layout",
              "hepreg.data.reader",
              "hepreg.data.synthetic", "hepreg.physics.detector")


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def hepreg_sources() -> dict[str, Path]:
    """Module name -> source file, from pyproject's package-dir (the one place that maps folders to packages)."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in dirs.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(module: str, path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules `module` imports (`from a import b`: a, and a.b too where that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = list(ast.iter_child_nodes(tree)) if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module-level statements, including those nested in if/try blocks
        stack, nodes = nodes, []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stack.extend(ast.iter_child_nodes(node))
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in SOURCES)
    return names


SOURCES = hepreg_sources()


def arrows(sources: dict[str, Path]) -> list[str]:
    """Every forbidden import in `sources`, as 'importer -> imported'."""
    bad = []
    for module, path in sources.items():
        for importer, banned in FORBIDDEN.items():
            if not under(module, importer) or any(under(module, e) for e in EXEMPT.get(importer, ())):
                continue
            for name in sorted(imports(module, path)):
                if any(under(name, b) for b in banned) and not under(name, module):
                    bad.append(f"{module} -> {name}")
    return bad


def test_the_rule_covers_every_layer():
    packages = {m for m in SOURCES if SOURCES[m].stem == "__init__"}
    assert {"hepreg.models", "hepreg.cache", "hepreg.data", "hepreg.stages"} <= packages
    for importer in FORBIDDEN:
        assert any(under(m, importer) for m in SOURCES), f"rule for {importer}, which has no module"


def test_the_top_level_holds_only_what_spans_the_layers():
    loose = {m for m, p in SOURCES.items() if m.count(".") <= 1 and p.parent.name == "pipeline"}
    assert loose == TOP_LEVEL, f"new top-level modules {sorted(loose - TOP_LEVEL)}: put them in a subpackage"


def test_no_import_runs_the_wrong_way():
    bad = arrows(SOURCES)
    assert not bad, "imports against the rule:\n" + "\n".join(bad)


def test_a_wrong_way_import_is_caught(tmp_path):
    bad = tmp_path / "head.py"
    bad.write_text("def f():\n    from hepreg.cache.schema import SCHEMA_VERSION\n")
    assert arrows({"hepreg.models.head": bad}) == ["hepreg.models.head -> hepreg.cache.schema"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_reach_no_torch(module):
    seen, todo, chain = set(), [module], {module: [module]}
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)]  # importing a.b.c runs a and a.b
        for name in imports(m, SOURCES[m], top_level_only=True) | set(parents):
            assert name.split(".")[0] != "torch", f"{' -> '.join(chain[m])} imports {name}"
            if name in SOURCES and name not in seen:
                chain.setdefault(name, chain[m] + [name])
                todo.append(name)
