"""The repository's promises to its users: the README's quick start is what CI runs, and every
subpackage is installed (a subpackage missing from setup.py works from the checkout and breaks in a
wheel)."""
from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]


def test_readme_quick_start_has_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, f"the quick start must be two commands (run the main job; run the tests), found {cmds}"
    assert "python -m fusedface.demo" in cmds[0], cmds[0]
    assert "pytest" in cmds[1], cmds[1]
    for cmd in cmds:
        assert "torch==2.13.0" in cmd and "--no-build-isolation" in cmd, (
            f"pin torch and build without isolation, or pip fetches a CUDA torch: {cmd}")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_cmd = _readme_commands()[1]
    assert test_cmd in ci_lines, f".ci/run must run the README's test command as written:\n{test_cmd}"


def _setup_packages() -> tuple[set[str], dict[str, str]]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: k.value for k in node.keywords}
            return set(ast.literal_eval(kw["packages"])), ast.literal_eval(kw["package_dir"])
    raise AssertionError("setup.py has no setup(...) call with packages=")


def test_every_subpackage_is_installed():
    packages, package_dir = _setup_packages()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fusedface").rglob("__init__.py")}
    on_disk |= {"fusedface.triton_kernels"}  # triton_kernels/ is installed under the package
    missing = on_disk - packages
    assert not missing, f"add {sorted(missing)} to packages= in setup.py"
    assert package_dir["fusedface.triton_kernels"] == "triton_kernels"
    assert "triton_kernels" not in packages, "never install a top-level triton_kernels (Triton ships one)"
