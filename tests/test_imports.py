"""Every module of dsjax and pallas_kernels imports on its own, in a fresh interpreter (no import
cycles, no module that only works after another was imported first). Reference: Python's own import
machinery: each module is imported with an empty cache of dsjax / pallas_kernels modules."""
import os
import pkgutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One interpreter for all modules (a fresh one per module costs jax's import each time): before each
# import, every dsjax / pallas_kernels module is dropped from sys.modules, so the module and whatever
# it imports of ours are executed from scratch, in the module's own import order.
_SCRIPT = r"""
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m.split(".")[0] in ("dsjax", "pallas_kernels")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\n" + traceback.format_exc(limit=-4))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules():
    names = []
    for pkg in ("dsjax", "pallas_kernels"):
        names.append(pkg)
        path = [os.path.join(ROOT, pkg)]
        # __main__ modules run a program when imported (python -m): they are not imported alone.
        names += [m.name for m in pkgutil.walk_packages(path, prefix=pkg + ".") if not m.name.endswith(".__main__")]
    return names


def test_every_module_imports_alone():
    mods = _modules()
    assert "dsjax.model.moe" in mods and "dsjax.parallel.expert_parallel" in mods and "pallas_kernels.moe.tpu" in mods
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, *mods], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def _imports(name: str, known: set[str]) -> set[str]:
    """Modules of ours that `name` imports anywhere in its file (top level or inside a function)."""
    import ast

    path = os.path.join(ROOT, *name.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    with open(path) as f:
        tree = ast.parse(f.read())
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module; else the name's module
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def test_no_import_cycles():
    """No two modules import each other, directly or through others, even inside functions (a late
    import hides a cycle from the test above but not from a reader). A package's __init__ that
    re-exports its submodules is left out as a target: importing pkg.sub runs pkg first anyway."""
    known = set(_modules())
    packages = {m for m in known if os.path.isdir(os.path.join(ROOT, *m.split(".")))}
    graph = {m: _imports(m, known) - packages for m in known}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(known):
        if m not in state:
            visit(m, [m])
    assert "dsjax.model.experts" in graph["dsjax.parallel.expert_parallel"]  # the walk sees real edges
    assert not cycles, "\n".join(cycles)
