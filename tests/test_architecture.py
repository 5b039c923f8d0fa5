"""The dependency rules of the layout, checked on the source (every import, also those
inside functions): flows -> pipeline -> storage, storage on numpy/pyarrow/zarr/fsspec
only, callers of storage use its public API, and no import cycle inside a package."""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = set(sys.stdlib_module_names)


def modules(package: str) -> dict[str, ast.Module]:
    """{dotted module name: parsed source} for every .py under `package`, sub-packages included."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        rel = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        for name in sorted(files):
            if name.endswith(".py"):
                mod = rel if name == "__init__.py" else f"{rel}.{name[:-3]}"
                out[mod] = ast.parse(open(os.path.join(folder, name)).read())
                if name == "__init__.py":
                    PACKAGES.add(mod)
    return out


PACKAGES: set[str] = set()


def _base(mod: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative levels resolved; a package's
    __init__ is its own level)."""
    if not node.level:
        return node.module
    parts = mod.split(".")[: len(mod.split(".")) - node.level + (1 if mod in PACKAGES else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports(package: str) -> dict[str, set[str]]:
    """{module: {imported module names, absolute}} for every module under `package`."""
    out = {}
    for mod, tree in modules(package).items():
        got = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                got |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = _base(mod, node)
                got |= {base} if node.module else {f"{base}.{a.name}" for a in node.names}
        out[mod] = got
    return out


@pytest.mark.parametrize("package", ["storage", "pipeline", "flows"])
def test_no_import_cycle_inside_a_package(package):
    graph = {m: {i for i in deps if i.startswith(package + ".") and i != m} for m, deps in imports(package).items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for d in graph[m]:
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_storage_depends_on_numpy_pyarrow_zarr_fsspec_only():
    allowed = {"numpy", "pyarrow", "zarr", "fsspec", "storage"}
    for mod, deps in imports("storage").items():
        extra = {d.split(".")[0] for d in deps} - allowed - STDLIB
        assert not extra, f"{mod} imports {sorted(extra)}"


def test_pipeline_never_imports_prefect_or_flows_and_uses_the_public_storage_api():
    for mod, deps in imports("pipeline").items():
        top = {d.split(".")[0] for d in deps}
        assert not top & {"prefect", "flows", "prefect_dask"}, f"{mod} imports {sorted(top & {'prefect', 'flows'})}"
        private = sorted(d for d in deps if d.startswith("storage."))
        assert not private, f"{mod} reaches past storage's public API: {private}"


def test_flows_use_the_public_storage_api():
    for mod, deps in imports("flows").items():
        private = sorted(d for d in deps if d.startswith("storage."))
        assert not private, f"{mod} reaches past storage's public API: {private}"


@pytest.mark.parametrize("package", ["storage", "pipeline", "flows"])
def test_no_private_name_is_imported_across_modules(package):
    """A `_name` is its module's own business: no other module imports it (tests may)."""
    found = []
    for mod, tree in modules(package).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [
                    f"{mod} imports {a.name} from {_base(mod, node)}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__future__" and node.module != "__future__"
                ]
    assert not found, "\n".join(found)
