"""The README's "Using the ops in your own model" snippets run as written."""
import pytest

from utils import readme_python_snippets

SECTION = "## Using the ops in your own model"


def snippets():
    return readme_python_snippets(inside=SECTION)


def test_the_section_has_three_snippets():
    assert len(snippets()) == 3


@pytest.mark.parametrize("index", range(3), ids=["nn-module", "hf-attention", "hf-moe-block"])
def test_snippet_runs(index):
    code = snippets()[index]
    if "transformers" in code:
        pytest.importorskip("transformers")
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "readme_snippet"})
