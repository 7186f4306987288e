"""The layout DESIGN.md asks for, checked from the source: the top-level modules import one another
only downwards (no circle, counting imports inside functions), each file stays a size a reader
can hold, and the public names of model.py are where users call them.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model  # noqa: E402

MODULES = {p.stem: p for p in ROOT.glob("*.py")}
MAX_LINES = {"model.py": 720, "t2t.py": 850}  # ~700 and ~800 with room for a preset; others: DEFAULT_MAX_LINES
DEFAULT_MAX_LINES = 900


def project_imports(path: Path) -> set:
    """The project modules `path` imports anywhere in the file (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & set(MODULES)) - {path.stem}


def cycle(graph: dict) -> list | None:
    """One import circle of `graph` ({module: modules it imports}) as a list of modules, or None."""
    state = {}  # module -> "open" while on the current path, "done" once all below it are explored

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_only_downwards():
    graph = {m: project_imports(p) for m, p in MODULES.items()}
    assert cycle(graph) is None, f"import circle: {' -> '.join(cycle(graph))}"
    # the bottom rooms never reach up to the network
    for low in ("files", "config", "tokenizer", "gguf_file", "checkpoints"):
        assert "model" not in graph[low], f"{low}.py imports model.py"
    assert graph["files"] == set(), graph["files"]


def test_file_sizes():
    for m, p in MODULES.items():
        n = len(p.read_text(encoding="utf-8").splitlines())
        assert n <= MAX_LINES.get(p.name, DEFAULT_MAX_LINES), f"{p.name} has {n} lines"


def test_public_names_of_model():
    """DESIGN.md's public interface, called from model.py."""
    for name in ("load", "Transformer", "Tokenizer", "Embedder", "ModelArgs", "ModelError", "args_from_config",
                 "add_lora", "lora_enabled", "merge_lora", "lora_state_dict", "load_lora", "save_lora"):
        assert callable(getattr(model, name, None)), name
    assert callable(model.Embedder.from_run) and callable(model.Embedder.from_pretrained)
