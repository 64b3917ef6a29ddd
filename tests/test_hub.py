"""Model directories and the Hugging Face Hub, offline: local directories never touch the
network, hub ids say clearly what is missing, uploads carry a model card, and config.json records
its format so that a newer one is refused with that said."""
import json
import sys

import pytest

from moediffuseq.hub import model_card, push_to_hub, resolve_model_dir
from moediffuseq.model import FORMAT_VERSION, FormatError, MoEDiffuSeq, MoEDiffuSeqConfig

SMALL = dict(vocab_size=40, max_len=16, d_emb=8, d_model=16, n_layers=1, n_heads=2, window=2, num_experts=2,
             d_expert=16, d_ff=32)


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "model"
    MoEDiffuSeq(MoEDiffuSeqConfig(**SMALL)).save_pretrained(directory)
    return directory


def test_config_records_format_and_library_version(model_dir):
    import moediffuseq

    record = json.loads((model_dir / "config.json").read_text())
    assert record["format_version"] == FORMAT_VERSION and record["library_version"] == moediffuseq.__version__
    assert MoEDiffuSeq.from_pretrained(model_dir).config == MoEDiffuSeqConfig(**SMALL)


def test_a_newer_format_is_refused_and_an_older_directory_still_loads(model_dir):
    record = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**record, "format_version": FORMAT_VERSION + 1,
                                                       "library_version": "9.0"}))
    with pytest.raises(FormatError, match=r"model format 2, written by moediffuseq 9.0; .* upgrade moediffuseq"):
        MoEDiffuSeq.from_pretrained(model_dir)
    legacy = {k: v for k, v in record.items() if k not in ("format_version", "library_version")}
    (model_dir / "config.json").write_text(json.dumps(legacy))
    assert MoEDiffuSeq.from_pretrained(model_dir).config == MoEDiffuSeqConfig(**SMALL)


def test_a_local_directory_is_used_as_it_is(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # never imported for a local directory
    assert resolve_model_dir(model_dir) == model_dir
    assert resolve_model_dir(model_dir.parent / "missing") == model_dir.parent / "missing"
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        MoEDiffuSeq.from_pretrained(model_dir.parent / "missing")


def test_a_hub_id_without_the_package_names_the_extra(monkeypatch):
    from moediffuseq.extras import missing_extra_message

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModuleNotFoundError) as error:
        resolve_model_dir("someone/some-model")
    assert missing_extra_message(error.value) == ("error: this needs the optional package 'huggingface_hub': "
                                                  "pip install \"moediffuseq[hub]\"")


def test_a_hub_id_offline_and_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache while the Hub cannot be reached"):
        resolve_model_dir("someone/some-model")


def test_push_to_hub_uploads_the_directory_with_a_model_card(model_dir, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(model_dir, "someone/tiny-moediffuseq", token="t")
    assert url == "https://huggingface.co/someone/tiny-moediffuseq"
    assert ("create", "someone/tiny-moediffuseq", False, True) in calls
    (upload,) = [c for c in calls if c[0] == "upload"]
    assert upload[2] == ["README.md", "config.json", "model.safetensors"]
    card = (model_dir / "README.md").read_text()
    assert "library_name: moediffuseq" in card and "| n_layers | 1 |" in card
    assert 'MoEDiffuSeqPipeline.from_pretrained("someone/tiny-moediffuseq")' in card


def test_model_card_names_the_training_run(model_dir):
    (model_dir.parent / "run_config.json").write_text(json.dumps(
        {"data": {"data": "pycode"}, "train": {"steps": 4000, "batch_size": 32, "lr": 0.002}}))
    assert "Trained on `pycode` for 4000 steps (batch 32, lr 0.002)." in model_card(model_dir, "a/b")


def test_config_json_names_its_model_type_and_refuses_another(model_dir):
    record = json.loads((model_dir / "config.json").read_text())
    assert record["model_type"] == "moediffuseq"
    (model_dir / "config.json").write_text(json.dumps({**record, "model_type": "llama"}))
    with pytest.raises(FormatError, match=r"config of a 'llama' model, not of a MoE-DiffuSeq model"):
        MoEDiffuSeq.from_pretrained(model_dir)


@pytest.fixture
def pipeline():
    from moediffuseq.data import TextTokenizer
    from moediffuseq.pipeline import MoEDiffuSeqPipeline

    tokenizer = TextTokenizer.train(["alpha beta gamma delta"] * 10, vocab_size=40)
    return MoEDiffuSeqPipeline(MoEDiffuSeq(MoEDiffuSeqConfig(**{**SMALL, "vocab_size": len(tokenizer)})), tokenizer,
                               target_len=4)


def test_the_pipeline_is_a_hub_mixin_that_uploads_its_directory_with_a_card(pipeline, monkeypatch, tmp_path):
    """push_to_hub is huggingface_hub's ModelHubMixin's (the Hub's API mocked: no network): it
    uploads save_pretrained's directory with the model card, which from_pretrained reads back."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.hub_mixin as hub_mixin

    from moediffuseq.pipeline import MoEDiffuSeqPipeline

    assert isinstance(pipeline, huggingface_hub.ModelHubMixin)
    calls = []

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            calls.append(("create", repo_id, private, exist_ok))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
            files = {p.name: p.read_bytes() for p in __import__("pathlib").Path(folder_path).iterdir()}
            calls.append(("upload", repo_id, files))
            return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    url = pipeline.push_to_hub("someone/tiny-moediffuseq", token="t", private=True)
    assert url == "https://huggingface.co/someone/tiny-moediffuseq/commit/1"
    assert ("token", "t") in calls and ("create", "someone/tiny-moediffuseq", True, True) in calls
    (upload,) = [c for c in calls if c[0] == "upload"]
    files = upload[2]
    assert sorted(files) == ["README.md", "config.json", "generation.json", "model.safetensors", "tokenizer.json"]
    card = files["README.md"].decode()
    assert "library_name: moediffuseq" in card and "| n_layers | 1 |" in card
    assert 'MoEDiffuSeqPipeline.from_pretrained("someone/tiny-moediffuseq")' in card
    assert json.loads(files["config.json"])["model_type"] == "moediffuseq"
    saved = tmp_path / "saved"
    for name, data in files.items():
        saved.mkdir(exist_ok=True)
        (saved / name).write_bytes(data)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # a local directory: no Hub needed to read it
    again = MoEDiffuSeqPipeline.from_pretrained(saved, device="cpu")
    assert again.target_len == 4 and again.model.config == pipeline.model.config


def test_without_huggingface_hub_push_to_hub_names_the_extra(tmp_path):
    from moediffuseq.extras import missing_extra_message
    from moediffuseq.hub import HubMixinWithoutHub

    class Saved(HubMixinWithoutHub, library_name="moediffuseq", tags=["x"]):
        def _save_pretrained(self, save_directory):
            (save_directory / "weights").write_text("w")

    Saved().save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "weights").read_text() == "w"
    with pytest.raises(ModuleNotFoundError) as error:
        Saved().push_to_hub("someone/x")
    assert missing_extra_message(error.value) == ("error: this needs the optional package 'huggingface_hub': "
                                                  "pip install \"moediffuseq[hub]\"")
