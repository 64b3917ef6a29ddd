"""Data: the jsonl loader's errors, the built-in corpora, the tokenizer and the packing."""
import json

import pytest
import torch

from moediffuseq.data import (DataFormatError, Example, Seq2SeqDataset, TextTokenizer, build_corpus, pack,
                              pack_source, read_jsonl, truncate_pair, write_jsonl)
from moediffuseq.data.dataset import BatchStream
from moediffuseq.data.tokenizer import SpecialIds

SPECIAL = SpecialIds(pad=0, cls=1, sep=2, unk=3)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"src": "a b c", "trg": "d e"})


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not valid JSON"),
    ('["src", "trg"]', "expected a JSON object"),
    ('{"src": "a"}', "missing key 'trg'"),
    ('{"src": "a", "trg": 3}', "'trg' must be a string"),
    ('{"src": "  ", "trg": "x"}', "empty 'src'"),
])
def test_malformed_line_is_reported_with_file_and_line(tmp_path, bad, why):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(DataFormatError, match=rf"train.jsonl:3: .*{why}"):
        read_jsonl(path)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed line\(s\) of 3"):
        loaded = read_jsonl(path, on_error="skip")
    assert len(loaded.examples) == 2 and loaded.skipped[0].startswith(f"{path}:3:")


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b'{"src": "\xff\xfe", "trg": "x"}\n')
    with pytest.raises(DataFormatError, match="not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        read_jsonl(tmp_path / "bin.jsonl", on_error="ignore")


def test_write_read_round_trip(tmp_path):
    examples = [Example("déf f(x):\n    return x", "ünïcode \"quoted\""), Example("s", "")]
    write_jsonl(tmp_path / "x.jsonl", examples)
    assert read_jsonl(tmp_path / "x.jsonl").examples == examples


@pytest.mark.parametrize("n_src, n_trg, budget", [(100, 10, 50), (10, 100, 50), (30, 30, 50), (5, 5, 50),
                                                    (31, 30, 50), (1, 200, 2), (7, 3, 9)])
def test_truncation_cuts_the_longer_side_first(n_src, n_trg, budget):
    s, t = truncate_pair(n_src, n_trg, budget)
    assert s + t == min(budget, n_src + n_trg) and 1 <= s <= n_src and 1 <= t <= n_trg
    if n_src + n_trg > budget:  # what remains of the longer side is never shorter than the other
        assert (s >= t) if n_src >= n_trg else (t >= s)
        assert abs(s - t) <= 1 or min(s, t) == min(n_src, n_trg)


def test_pack_layout():
    ids, start = pack([10, 11, 12], [20, 21], 10, SPECIAL)
    assert ids == [1, 10, 11, 12, 2, 20, 21, 2, 0, 0] and start == 5
    ids, start = pack(list(range(10, 30)), [40, 41], 10, SPECIAL)  # source truncated first
    assert ids[0] == 1 and ids[start - 1] == 2 and ids[start:] == [40, 41, 2] and len(ids) == 10
    src_ids, src_start = pack_source(list(range(10, 30)), 10, 2, SPECIAL)
    assert src_ids[:src_start] == ids[:start] and set(src_ids[src_start:]) == {0}


def test_tokenizer_train_save_load_and_round_trip(tmp_path):
    texts = ["def add(a, b):\n    return a + b", "Return the sum of a and b."] * 20
    tok = TextTokenizer.train(texts, vocab_size=300)
    assert tok.special == SPECIAL
    assert tok.decode(tok.encode(texts[0])) == texts[0]  # byte-level BPE keeps the layout
    loaded = TextTokenizer.load(tok.save(tmp_path))
    assert loaded.encode(texts[1]) == tok.encode(texts[1])
    wp = TextTokenizer.train(texts, vocab_size=300, kind="wordpiece")
    assert "sum" in wp.decode(wp.encode(texts[1]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        TextTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        TextTokenizer.load(tmp_path / "none.json")
    with pytest.raises(ValueError, match="'bpe' or 'wordpiece'"):
        TextTokenizer.train(texts, kind="unigram")


def test_foreign_tokenizer_without_special_tokens_is_refused():
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[PAD\]'"):
        TextTokenizer(Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))


def test_dataset_masks_and_batch_stream():
    texts = [Example(f"source number {i} " * (i % 5 + 1), f"target {i}") for i in range(40)]
    tok = TextTokenizer.train([t for e in texts for t in (e.src, e.trg)], vocab_size=200)
    ds = Seq2SeqDataset(texts, tok, seq_len=24)
    batch = ds.batch([0, 7])
    assert batch.input_ids.shape == (2, 24) and batch.target_mask.dtype == torch.bool
    for row, mask in zip(batch.input_ids.tolist(), batch.target_mask.tolist()):
        start = mask.index(True)
        assert row[0] == 1 and row[start - 1] == 2 and not any(mask[:start]) and all(mask[start:])
    stream = BatchStream(len(ds), batch_size=16, seed=3)
    first = [stream.next() for _ in range(3)]  # 40 // 16 = 2 batches an epoch: the third starts epoch 1
    assert stream.epoch == 1 and len(set(torch.cat(first[:2]).tolist())) == 32
    state = stream.state_dict()
    again = BatchStream(len(ds), batch_size=16)
    again.load_state_dict(state)
    assert torch.equal(again.next(), stream.next())
    ranks = [BatchStream(len(ds), 8, seed=1, rank=r, world_size=2).next() for r in range(2)]
    assert torch.equal(torch.cat(ranks), BatchStream(len(ds), 16, seed=1).next())
    with pytest.raises(ValueError, match="larger than the training set"):
        BatchStream(10, batch_size=8, world_size=2)


def test_aclsum_corpus(tmp_path):
    pytest.importorskip("aclsum")
    directory = build_corpus("aclsum", tmp_path / "aclsum")
    train = read_jsonl(directory / "train.jsonl").examples
    assert len(train) == 100 and all(len(e.src.split()) > 300 and len(e.trg.split()) > 20 for e in train)
    assert build_corpus("aclsum", tmp_path / "aclsum") == directory  # cached


def test_pycode_corpus_is_deterministic_and_split_by_file(tmp_path):
    d1 = build_corpus("pycode", tmp_path / "a")
    d2 = build_corpus("pycode", tmp_path / "b")
    for split in ("train", "valid", "test"):
        assert (d1 / f"{split}.jsonl").read_bytes() == (d2 / f"{split}.jsonl").read_bytes()
    train = read_jsonl(d1 / "train.jsonl").examples
    test = read_jsonl(d1 / "test.jsonl").examples
    assert len(train) > 2000 and len(test) > 100
    assert all(e.src.lstrip().startswith(("def ", "async def ")) and e.trg for e in train[:200])
    assert not {e.src for e in train} & {e.src for e in test}
    with pytest.raises(ValueError, match="unknown corpus"):
        build_corpus("wikipedia", tmp_path / "c")


def test_a_byte_order_mark_does_not_reject_the_first_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n" + GOOD + "\n").encode())
    assert read_jsonl(path).examples == [Example("a b c", "d e")] * 2


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_special_token_names_in_user_text_are_text(kind):
    texts = ["the [SEP] token and [PAD] and [CLS] and [UNK] appear in code", "plain words here"] * 10
    tok = TextTokenizer.train(texts, vocab_size=200, kind=kind)
    ids = tok.encode("the token [SEP] and [PAD] in code [CLS] here")
    assert not set(ids) & {tok.special.pad, tok.special.cls, tok.special.sep}
    decoded = tok.decode(ids)
    for word in ("the", "token", "SEP", "and", "PAD", "code", "CLS", "here"):
        assert word in decoded
    ds = Seq2SeqDataset([Example("source [SEP] more source", "target [SEP] more target")], tok, seq_len=64)
    row = ds.input_ids[0].tolist()
    assert row.count(tok.special.sep) == 2  # only the packing's own separators


def _long_texts(seed, n=12):
    rng = torch.Generator().manual_seed(seed)
    pieces = ["alpha", "beta", "ünïcode", "x" * 150, "   ", "\n", "\t", "def", "(a, b):", "==", "12345", "中文",
              "[SEP]", "don't", "    return", ",", "."]
    texts = []
    for _ in range(n):
        k = int(torch.randint(1, 400, (1,), generator=rng))
        idx = torch.randint(0, len(pieces), (k,), generator=rng).tolist()
        texts.append("".join(pieces[i] + (" " if j % 3 else "") for j, i in enumerate(idx)))
    return texts + ["", "single", "x" * 5000, " " * 3000 + "tail"]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_truncated_tokenization_equals_the_start_of_the_full_one(kind):
    tok = TextTokenizer.train(_long_texts(0), vocab_size=300, kind=kind)
    texts = _long_texts(1)
    full = tok.encode_batch(texts)
    for max_tokens in (1, 2, 7, 30, 100, 1000):
        assert tok.encode_batch(texts, max_tokens=max_tokens) == [ids[:max_tokens] for ids in full], max_tokens


def test_a_huge_line_is_tokenized_only_as_far_as_it_can_be_used():
    """A 4 MB source costs what its first L tokens cost: only a prefix reaches the tokenizer."""
    tok = TextTokenizer.train(["some words of text"] * 20, vocab_size=100)
    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def encode_batch(self, texts, **kwargs):
            seen.extend(len(t) for t in texts)
            return self.inner.encode_batch(texts, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    huge = "some words of text " * 200_000
    reference = Seq2SeqDataset([Example("some words", "text")], tok, seq_len=32)
    tok.tokenizer = Recording(tok.tokenizer)
    ds = Seq2SeqDataset([Example(huge, "of text"), Example("some words", "text")], tok, seq_len=32)
    assert max(seen) < 10_000
    assert ds.truncated == 1 and int(ds.src_lengths[0]) == 30  # counted as truncated, capped at L - 2
    assert torch.equal(ds.input_ids[1], reference.input_ids[0])
    row = ds.input_ids[0].tolist()
    source = tok.decode(row[1:row.index(tok.special.sep)])  # what is left of the source: its beginning
    assert len(source) >= 20 and huge.startswith(source)


def test_capped_lengths_truncate_like_the_full_ones():
    for budget in range(2, 24):
        for n_src in range(0, 40):
            for n_trg in range(0, 40):
                if n_src + n_trg == 0:
                    continue
                capped = truncate_pair(min(n_src, budget + 1), min(n_trg, budget + 1), budget)
                assert capped == truncate_pair(n_src, n_trg, budget)
