"""The scripts in examples/ run as written, at a tiny size (each is a recipe of the README)."""
import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.exists(), reason="examples/ not beside tests/")


def load(name, source=None):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source or path.read_text(), str(path), "exec"), module.__dict__)
    return module


def test_opacus_script_runs_with_the_import_swapped(capsys):
    out = load("opacus_mnist").main(["--epochs", "2"])
    assert 0 < out["epsilon"] < 10 and out["accuracy"] > 0.2
    assert "epsilon =" in capsys.readouterr().out


def test_the_same_script_is_opacus_code(capsys):
    """Only the two imports differ from an Opacus script: swapped back, it runs under Opacus itself."""
    pytest.importorskip("opacus")
    text = (EXAMPLES / "opacus_mnist.py").read_text()
    text, n = re.subn(r"^from dpfast import PrivacyEngine.*$", "from opacus import PrivacyEngine", text, flags=re.M)
    text, m = re.subn(r"^from dpfast\.utils\.batch_memory_manager import BatchMemoryManager.*$",
                      "from opacus.utils.batch_memory_manager import BatchMemoryManager", text, flags=re.M)
    assert n == m == 1 and "dpfast" not in text.split('"""', 2)[2]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = load("opacus_mnist_original", text).main(["--epochs", "1"])
    assert out["epsilon"] > 0
