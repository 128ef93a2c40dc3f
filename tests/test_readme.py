"""The README's API example runs as written (it is the first thing a user copies)."""
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not README.exists(), reason="README.md not beside tests/")
def test_readme_api_example_runs(capsys):
    text = README.read_text()
    start = text.index("```python\nimport torch\nfrom torch import nn")
    code = text[start + len("```python\n"):text.index("```", start + 9)]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    eps = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < eps < 100
