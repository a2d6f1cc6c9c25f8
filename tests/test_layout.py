"""The code's structure, checked from the source: no import cycles between the project's modules, eval/ on
the top floor (nothing in mt/ or the stage scripts imports it), and imports at the top of every file except
the optional heavy packages named below. `python -m pytest -q tests/test_layout.py` is the check."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# optional packages imported only when asked for (each lazy import carries a comment saying so)
LAZY_OK = {"pyarrow", "pyarrow.parquet", "matplotlib", "matplotlib.pyplot", "gguf", "gguf.quants", "tensorboard",
           "wandb", "torch.utils.tensorboard", "tiktoken",
           "trl", "trl.trainer.dpo_trainer", "trl.trainer.reward_trainer", "datasets", "accelerate",  # eval/bench_trl.py
           "torch._dynamo.config"}  # torch.compile's stack, for --sampling.compile only


def modules() -> dict[str, Path]:
    out = {p.stem: p for p in REPO.glob("*.py")}
    for pkg in ("mt", "eval"):
        out.update({f"{pkg}.{p.stem}": p for p in (REPO / pkg).glob("*.py") if p.stem != "__init__"})
    return out


def imports(path: Path, top_only: bool) -> set[str]:
    """Project modules imported by a file (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.If):  # `if __package__ in (None, ""):` path set-up, then imports below it
            continue
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(p, top_only=False) if i in mods and i != m} for m, p in mods.items()}


def test_no_import_cycles():
    g = graph()
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(g[m]):
            visit(n)
        stack.pop()
    for m in sorted(g):
        visit(m)
    assert not cycles, cycles


def test_eval_is_the_top_floor():
    g = graph()
    below = {m: deps for m, deps in g.items() if not m.startswith("eval.")}
    assert not {m: sorted(d for d in deps if d.startswith("eval.")) for m, deps in below.items()
                if any(d.startswith("eval.") for d in deps)}


def test_imports_at_the_top_of_every_file():
    late = {}
    for m, p in modules().items():
        tree = ast.parse(p.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                bad = [n for n in names if n not in LAZY_OK and n != "__future__"]
                if bad and not _under_main_guard(tree, node):
                    late.setdefault(m, []).append((node.lineno, bad))
    assert not late, late


def _under_main_guard(tree, node) -> bool:
    """Imports inside `if __package__ ...:` / `if __name__ == "__main__":` blocks at module level are set-up."""
    for top in tree.body:
        if isinstance(top, ast.If) and any(n is node for n in ast.walk(top)):
            return True
    return False
