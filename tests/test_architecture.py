"""The code's shape: import direction, private names, one definition of the run settings."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

import experiments.run  # noqa: F401  (defines the flags)
from experiments.config import AFFECTS, DERIVED, FIELDS, STAGES, Settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fcjax", "probes", "experiments")
# being rewritten by the lead engineer; they still read private names of other packages
PENDING: tuple[str, ...] = ()


def test_import_contracts_hold():
    """fcjax never imports probes/experiments, probes never experiments, fcjax layered."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _top(module: str) -> str:
    return module.split(".")[0]


def _private_uses(source: str, rel: str) -> list[str]:
    """``from pkg.x import _name`` and ``mod._name`` where pkg/mod is another package than
    the one of ``rel`` (a path relative to the repository root)."""
    own = Path(rel).parts[0]
    tree = ast.parse(source)
    other_modules = {}  # local name -> imported module of another package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _top(node.module) in PACKAGES:
            foreign = _top(node.module) != own
            for alias in node.names:
                if foreign and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{rel}:{node.lineno} imports {node.module}.{alias.name}")
                if foreign:
                    other_modules[alias.asname or alias.name] = node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) in PACKAGES and _top(alias.name) != own:
                    other_modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in other_modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{rel}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_a_private_name_of_another_package():
    files = [p for d in (*PACKAGES, "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    files = [p for p in files if str(p.relative_to(ROOT)) not in PENDING]
    assert len(files) > 50
    found = [use for p in files for use in _private_uses(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_private_name_scan_catches_both_forms():
    text = "from fcjax.models import loading\nfrom fcjax.models.loading import _to_layout\n"
    text += "x = loading._GLOBAL\n"
    assert len(_private_uses(text, "experiments/x.py")) == 2
    assert _private_uses(text, "fcjax/models/x.py") == []  # own package: allowed


def test_every_setting_has_a_stage_and_a_flag():
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names)) > 20
    for f in FIELDS:
        assert {"help", "stage", "choices", "minimum"} <= set(f.metadata), f.name
        assert f.metadata["stage"] in (*STAGES, None), f.name
        assert f.metadata["help"], f.name
    # only settings that cannot change a result may name no stage
    assert [f.name for f in FIELDS if f.metadata["stage"] is None] == ["batch_size"]
    assert set(AFFECTS) == (set(names) - {"batch_size"}) | set(DERIVED)
    # the flags are derived from the fields: same names, defaults and help
    for f in FIELDS:
        flag = flags.FLAGS[f.name]
        default = list(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        assert flag.default == default, f.name
        assert flag.help.endswith(f.metadata["help"]), f.name
        if f.metadata["choices"] and not isinstance(f.default, tuple):  # list flags: validators
            assert list(flag.parser.enum_values) == list(f.metadata["choices"]), f.name
    assert dataclasses.asdict(Settings())["estimators"] == (
        "deepconf",
        "rcc",
        "sampling",
        "probe",
        "forcing",
    )


@pytest.mark.integration
def test_compilation_cache_stores_programs_for_the_next_process(tmp_path):
    code = (
        "import sys, jax, jax.numpy as jnp, fcjax\n"
        "fcjax.enable_compilation_cache(sys.argv[1])\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(7.0)).sum())\n"
    )
    cache = tmp_path / "jax"
    first = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert any(cache.iterdir())  # the program was written
    second = subprocess.run(
        [sys.executable, "-c", code, str(cache)], capture_output=True, text=True
    )
    assert second.stdout == first.stdout


def _jitted_model_programs(tree: ast.Module):
    """(name, keywords) of the functions decorated ``functools.partial(jax.jit, ...)`` whose
    first argument is the model's graphdef."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef) or not node.args.args:
            continue
        if node.args.args[0].arg != "graphdef":
            continue
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and dec.args and ast.unparse(dec.args[0]) == "jax.jit":
                yield node.name, {k.arg: ast.unparse(k.value) for k in dec.keywords}


def test_every_jitted_model_program_takes_the_models_xla_options():
    """Each jitted program over the model's weights (``graphdef`` first) in fcjax compiles
    with ``XLA_OPTIONS`` (on GPU, no DotMerger re-concatenating weights every step)."""
    found = {}
    for path in sorted((ROOT / "fcjax").rglob("*.py")):
        for name, keywords in _jitted_model_programs(ast.parse(path.read_text())):
            found[f"{path.relative_to(ROOT)}:{name}"] = keywords.get("compiler_options")
    assert {"fcjax/engine/decode.py:decode_chunk", "fcjax/engine/decode.py:prefill_into"} <= set(
        found
    )
    missing = [where for where, options in found.items() if options != "XLA_OPTIONS"]
    assert not missing, f"jitted without compiler_options=XLA_OPTIONS: {missing}"
