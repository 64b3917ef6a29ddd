"""The README's "Using the ops in your own model" snippets run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using the ops in your own model"


def snippets():
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_the_section_has_three_snippets():
    assert len(snippets()) == 3


@pytest.mark.parametrize("index", range(3), ids=["nn-module", "hf-attention", "hf-moe-block"])
def test_snippet_runs(index):
    code = snippets()[index]
    if "transformers" in code:
        pytest.importorskip("transformers")
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "readme_snippet"})
