"""Every Python snippet of the README outside "Using the ops in your own model" (which
tests/test_readme.py runs) runs as written, in order, in one namespace (a later snippet may
continue an earlier one), in a scratch directory."""
from utils import readme_python_snippets

OPS_SECTION = "## Using the ops in your own model"


def snippets() -> list[str]:
    return readme_python_snippets(outside=OPS_SECTION)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    code = snippets()
    assert len(code) >= 3
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_snippet"}
    for i, snippet in enumerate(code):
        exec(compile(snippet, f"README.md python snippet {i + 1}", "exec"), namespace)
    assert (tmp_path / "runs" / "mine-tuned" / "model" / "model.safetensors").is_file()
