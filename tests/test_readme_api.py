"""Every Python snippet of the README outside "Using the ops in your own model" (which
tests/test_readme.py runs) runs as written, in order, in one namespace (a later snippet may
continue an earlier one), in a scratch directory."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
OPS_SECTION = "## Using the ops in your own model"


def snippets() -> list[str]:
    text = README.read_text()
    if OPS_SECTION in text:
        start = text.index(OPS_SECTION)
        end = text.find("\n## ", start + len(OPS_SECTION))
        text = text[:start] + (text[end:] if end > 0 else "")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    code = snippets()
    assert len(code) >= 3
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_snippet"}
    for i, snippet in enumerate(code):
        exec(compile(snippet, f"README.md python snippet {i + 1}", "exec"), namespace)
    assert (tmp_path / "runs" / "mine-tuned" / "model" / "model.safetensors").is_file()
