"""The package's shape: imports flow one way, the solver and kernel packages stand alone, the
public API stays small, the source tree's folders hide nothing, and the CLI starts fast."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import twla

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"twla": ROOT / "twla", "twla.solvers": ROOT / "solvers", "twla.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if package == "twla" and parts[0] in ("solvers", "kernels"):
                continue
            found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """The twla modules that ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # TYPE_CHECKING blocks do not run
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("twla"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("twla")}
    return {n for n in names if n in modules}


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules, top_level_only=True) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join([*trail[trail.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_solvers_and_kernels_import_nothing_else_of_twla():
    """The kernels stand alone; the solvers use the kernels' quantizers and nothing else of twla."""
    modules = _modules()
    allowed = {"twla.kernels": ("twla.kernels",), "twla.solvers": ("twla.solvers", "twla.kernels")}
    for name, path in modules.items():
        for package, inside in allowed.items():
            if name.startswith(package):
                foreign = {m for m in _imports(path, modules, top_level_only=False) if not m.startswith(inside)}
                assert not foreign, f"{name} imports {sorted(foreign)}"


def test_public_api_is_small_and_resolves():
    assert len(twla.__all__) <= 25
    for name in twla.__all__:
        assert getattr(twla, name) is not None


def test_no_module_grows_past_its_screenful():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= 450, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_transformers_loads_a_model_from_the_source_trees_root(tiny_checkpoint):
    """The root's kernels/ folder (installed as twla.kernels) never hides the `kernels` distribution
    that transformers imports, whether or not twla was imported first."""
    code = (
        "from transformers import AutoModelForCausalLM as A\n"
        f"A.from_pretrained({tiny_checkpoint!r})\n"
        "import importlib.util, kernels\n"
        "print(kernels.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    if "No module named 'kernels'" in done.stderr:  # no kernels distribution installed: the folder stays out of it
        assert "Error" not in done.stderr.replace("ModuleNotFoundError: No module named 'kernels'", "")
        return
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.strip().startswith(str(ROOT / "kernels")), done.stdout


def test_import_twla_imports_neither_torch_nor_transformers():
    code = "import sys, twla; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_packed_format_registers_when_transformers_is_imported_after_twla():
    code = (
        "import twla\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "print('twla' in AUTO_QUANTIZER_MAPPING)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_help_imports_no_subcommand():
    code = (
        "import sys\n"
        "from twla.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print([m for m in sys.modules if m.startswith('twla.cli.') or m == 'torch'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
