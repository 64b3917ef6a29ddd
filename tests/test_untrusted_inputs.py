"""Smaller input faults, each refused by name: invalid UTF-8 and lone surrogates in jsonl (with
--skip-bad-lines skipped), an empty training split, an empty generate input, duplicate keys in a
config file, a mistyped local path that names a Hub repository, and the mode of saved weights."""
import io
import json
import os
import stat
import sys

import pytest

from moediffuseq.cli import main
from moediffuseq.data import read_jsonl
from moediffuseq.data.jsonl import DataFormatError


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = b'{"src": "alpha beta", "trg": "gamma"}'


def test_invalid_utf8_is_a_bad_line_that_skip_bad_lines_skips(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, b'{"src": "caf\xe9", "trg": "x"}', GOOD])
    with pytest.raises(DataFormatError, match=rf"{path}:2: not UTF-8 text .* --skip-bad-lines"):
        read_jsonl(path)
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        loaded = read_jsonl(path, "skip")
    assert len(loaded.examples) == 2 and loaded.skipped[0].startswith(f"{path}:2: not UTF-8")


def test_a_lone_surrogate_escape_is_named_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, GOOD, b'{"src": "a \\ud800 b", "trg": "x"}'])
    with pytest.raises(DataFormatError, match=rf"{path}:3: 'src' holds a lone surrogate escape"):
        read_jsonl(path)
    with pytest.warns(UserWarning):
        assert len(read_jsonl(path, "skip").examples) == 2


def test_an_empty_training_split_is_named(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("\n\n")
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    assert f"{tmp_path / 'data' / 'train.jsonl'} holds no examples" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_generate_on_an_empty_input_is_an_error(tmp_path, capsys, monkeypatch):
    from moediffuseq.generate_files import read_sources

    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("empty.txt", "empty.jsonl"):
        with pytest.raises(ValueError, match=f"{tmp_path / name} holds no sources"):
            read_sources(tmp_path / name)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n")))
    with pytest.raises(ValueError, match="standard input holds no sources"):
        read_sources("-")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfalpha\n\n beta \n")))
    assert [e.src for e in read_sources("-")] == ["alpha", "beta"]


@pytest.mark.parametrize("name, text", [("c.yaml", "train:\n  steps: 3\n  lr: 1.0e-3\n  steps: 4\n"),
                                        ("c.json", '{"train": {"steps": 3, "steps": 4}}')])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys, name, text):
    (tmp_path / name).write_text(text)
    assert main(["train", "--data", "pycode", "--out", str(tmp_path / "run"), "--config", str(tmp_path / name)]) == 2
    assert "the key 'steps' is given twice" in capsys.readouterr().err


def test_a_mistyped_local_path_downloads_nothing_but_a_config(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub

    from moediffuseq.hub_download import resolve_model_dir

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(allow_patterns)
        (tmp_path / "snap").mkdir(exist_ok=True)
        (tmp_path / "snap" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="runz/model: no such local directory, and the Hugging Face Hub"):
        resolve_model_dir("runz/model")
    assert calls == [["config.json"]]  # only the config was fetched
    (tmp_path / "runs").mkdir()
    assert resolve_model_dir("runs/model") == tmp_path.joinpath("runs", "model").relative_to(tmp_path)
    assert len(calls) == 1  # "runs" is a local directory: a local path, the Hub never asked


def test_saved_weights_are_as_readable_as_any_file(tmp_path):
    from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig

    umask = os.umask(0o022)
    try:
        MoEDiffuSeq(MoEDiffuSeqConfig.preset("tiny", n_layers=1, vocab_size=64)).save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
