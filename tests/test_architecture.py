"""The dependency rules of the layout, checked on the source (every import, also those
inside functions): flows -> pipeline -> storage, storage on numpy/pyarrow/zarr/fsspec
only, callers of storage use its public API, and no import cycle inside a package."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = set(sys.stdlib_module_names)


def imports(package: str) -> dict[str, set[str]]:
    """{module: {imported module names, absolute}} for every .py in `package`."""
    out = {}
    for name in sorted(os.listdir(os.path.join(ROOT, package))):
        if not name.endswith(".py"):
            continue
        mod = f"{package}.{name[:-3]}" if name != "__init__.py" else package
        tree = ast.parse(open(os.path.join(ROOT, package, name)).read())
        got = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                got |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative: from .x import y  /  from . import x
                    base = package if node.module is None else f"{package}.{node.module}"
                    got |= {base} if node.module else {f"{package}.{a.name}" for a in node.names}
                else:
                    got.add(node.module)
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
