"""No argparse namespace past the CLI (issue 10): flags are parsed and validated by the CLI layer
into typed configs (mvlm.config's dataclasses, ConvertConfig, ExportConfig, ...); every other
module takes those. The CLI layer is mvlm/cli.py, mvlm/train/args.py, the ``flags`` modules
(parser builders and namespace -> config converters) and a sub-command's entry module that
parses its own command line (it owns that namespace and converts it right there). Parser
builders (``add_*_args`` for the --help screens) may use argparse anywhere."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI_LAYER = {"mvlm/cli.py", "mvlm/train/args.py"}
# ms-swift's reward plugin API: a reward class is constructed with the run's args object, which
# mvlm.rl.rewards reads into its RewardConfig (the guide's plugin files run unchanged).
PLUGIN_API = {"mvlm/rl/rewards.py"}
# Modules that still receive a namespace past the CLI (none left: `mvlm convert` and `mvlm
# export` take ConvertConfig / ExportConfig). The set may only shrink.
NOT_YET_TYPED: set[str] = set()
_NS_NAMES = {"ns", "args"}


def _annotation_is_namespace(node: ast.expr | None) -> bool:
    if node is None:
        return False
    text = ast.unparse(node)
    return text.strip("'\"") in ("argparse.Namespace", "Namespace")


def namespace_uses(path: Path) -> list[str]:
    """Why ``path`` handles a parsed namespace (empty when it does not)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs:
                if _annotation_is_namespace(arg.annotation):
                    out.append(f"{node.name}({arg.arg}: {ast.unparse(arg.annotation)})")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "getattr" and node.args and \
                    isinstance(node.args[0], ast.Name) and node.args[0].id in _NS_NAMES:
                out.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr == "mvlm_adapter_config":
            out.append(f"line {node.lineno}: side channel {ast.unparse(node)}")
    return out


def parses_a_command_line(path: Path) -> bool:
    """Whether the module parses flags itself (``parse_args`` / ``parse_known_args``)."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr in ("parse_args", "parse_known_args")
               for n in ast.walk(ast.parse(path.read_text(), filename=str(path))))


def test_no_namespace_past_the_cli():
    found = {}
    for path in sorted((REPO / "mvlm").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in CLI_LAYER | PLUGIN_API or path.name == "flags.py" or \
                path.name.endswith("_flags.py") or parses_a_command_line(path):
            continue
        uses = namespace_uses(path)
        if uses:
            found[rel] = uses
    new = {k: v for k, v in found.items() if k not in NOT_YET_TYPED}
    assert not new, f"argparse namespaces past the CLI layer (take a mvlm.config type): {new}"
    done = NOT_YET_TYPED - set(found)
    assert not done, f"{sorted(done)} no longer take a namespace: drop them from NOT_YET_TYPED"


def test_the_checker_sees_each_pattern(tmp_path):
    """The scan above catches what it looks for (so an empty result means something)."""
    f = tmp_path / "m.py"
    f.write_text("import argparse\n"
                 "def a(ns: argparse.Namespace): pass\n"
                 "def b(x: 'Namespace'): pass\n"
                 "def c(args): return getattr(args, 'seed', 42)\n"
                 "def e(ns): ns.mvlm_adapter_config = 1\n"
                 "def ok(cfg, p: argparse.ArgumentParser): return getattr(cfg, 'x', 1)\n")
    uses = namespace_uses(f)
    assert len(uses) == 4, uses
    assert not any("ok" in u or "cfg" in u for u in uses), uses
    assert not parses_a_command_line(f)
    f.write_text(f.read_text() + "def main(p): return a(p.parse_known_args([])[0])\n")
    assert parses_a_command_line(f)


def test_config_module_is_light():
    """mvlm.config is read while flags are validated (before torch is imported)."""
    code = ("import sys, mvlm.config, mvlm.train.args; "
            "heavy = [m for m in ('torch', 'megatron', 'datasets', 'transformers') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
