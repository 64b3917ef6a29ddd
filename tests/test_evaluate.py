"""The evaluation suite on cases whose scores are known."""
import json

import pytest

from moediffuseq.evaluate import evaluate_texts, format_table, read_generations, sentence_bleu


def test_identical_text_scores_one_and_disjoint_text_zero():
    refs = ["return the sum of two numbers", "open the file and read every line"]
    same = evaluate_texts(refs, refs)
    assert same["bleu"] == pytest.approx(1.0) and same["rougeL"] == pytest.approx(1.0)
    assert same["sacrebleu"] == pytest.approx(100.0) and same["avg_len"] == pytest.approx(6.5)
    other = evaluate_texts(["zzz qqq", "xxx"], refs)
    assert other["rouge1"] == 0.0 and other["rougeL"] == 0.0 and other["bleu"] < 0.05
    assert other["self_bleu"] is None and other["div4"] is None


def test_partial_overlap_is_between_and_ordered():
    ref = ["return the sum of two numbers"]
    close = evaluate_texts(["return the sum of numbers"], ref)
    far = evaluate_texts(["the numbers"], ref)
    assert 0 < far["rougeL"] < close["rougeL"] < 1 and 0 < far["bleu"] < close["bleu"] < 1


def test_diversity_metrics():
    assert evaluate_texts(["a b a b"], ["a b"])["dist1"] == pytest.approx(0.5)
    same = evaluate_texts(["w x y z v"], ["w"], candidates=[["w x y z v", "w x y z v"]])
    assert same["self_bleu"] == pytest.approx(1.0) and same["div4"] == pytest.approx(0.5)
    varied = evaluate_texts(["w x y z v"], ["w"], candidates=[["w x y z v", "a b c d e"]])
    assert varied["self_bleu"] < 0.1 and varied["div4"] == pytest.approx(1.0)
    assert sentence_bleu([], ["a"]) == 0.0


def test_errors_and_table(tmp_path):
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        evaluate_texts(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no hypotheses"):
        evaluate_texts([], [])
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"reference": "a", "hypothesis": "a"}) + "\n" + json.dumps({"hypothesis": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"g.jsonl:2: not a generation record"):
        read_generations(path)
    table = format_table({"sys": evaluate_texts(["a b c d e"], ["a b c d e"])})
    assert table.splitlines()[2].startswith("| sys | 1.0000") and "n/a" in table


def test_read_generations_refuses_wrong_types_instead_of_guessing(tmp_path):
    path = tmp_path / "g.jsonl"
    for record, why in (({"reference": "a", "hypothesis": "a", "candidates": "abc"}, "'candidates' must be a list"),
                        ({"reference": None, "hypothesis": "a"}, "'reference' must be a string"),
                        ({"reference": "a", "hypothesis": 3}, "'hypothesis' must be a string"),
                        ({"reference": "a", "hypothesis": "b", "candidates": ["x", None]}, "'candidates'")):
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=rf"g.jsonl:1: .*{why}"):
            read_generations(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"reference": "a", "hypothesis": "b"}).encode() + b"\n")
    assert read_generations(path)[1:3] == (["a"], ["b"])  # a UTF-8 byte-order mark is not part of the text


def test_evaluate_keeps_a_row_per_file_when_names_repeat(tmp_path, capsys):
    from moediffuseq.cli import main

    paths = []
    for system, hyp in (("a", "x y"), ("b", "x z")):
        (tmp_path / system).mkdir()
        paths.append(tmp_path / system / "test.jsonl")
        paths[-1].write_text(json.dumps({"reference": "x y", "hypothesis": hyp}) + "\n")
    out = tmp_path / "scores.json"
    assert main(["evaluate", *map(str, paths), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert sorted(rows) == sorted(map(str, paths)) and rows[str(paths[0])] != rows[str(paths[1])]


DOCSTRINGS = ["Return the value of the key (as a string), or None.",
              "Split the path into a pair (head, tail); tail is everything after the final slash.",
              "Return True if the object is callable, i.e. has a __call__() method.",
              "Encode the string s, using the codec registered for 'utf-8'."]


def _wordpiece():
    from moediffuseq.data import TextTokenizer

    return TextTokenizer.train(DOCSTRINGS * 20, vocab_size=400, kind="wordpiece")


def test_a_perfect_output_scores_one_against_references_decoded_from_ids():
    """The model's output is text decoded from token ids; so must the reference be (DiffuSeq)."""
    from moediffuseq.evaluate import decoded

    tok = _wordpiece()
    perfect = [tok.decode(tok.encode(d)) for d in DOCSTRINGS]  # what a model emitting the target's ids writes
    raw = evaluate_texts(perfect, DOCSTRINGS)["bleu"]
    assert raw < 0.9  # the mismatch scored before: punctuation split on one side only
    scores = evaluate_texts(perfect, decoded(DOCSTRINGS, tok))
    assert scores["bleu"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(1.0)
    assert decoded(perfect, tok) == perfect  # idempotent: decoded text decodes to itself


def test_bootstrap_intervals_hold_the_mean_and_shrink_to_a_point_when_all_agree():
    from moediffuseq.evaluate import bootstrap_intervals, format_intervals

    refs = ["return the sum of two numbers", "open the file", "read every line", "close it now"]
    hyps = ["return the sum of numbers", "open a file", "zzz", "close it now"]
    iv = bootstrap_intervals(hyps, refs, samples=400)
    point = evaluate_texts(hyps, refs)
    for key in ("bleu", "rouge1", "rouge2", "rougeL"):
        lo, hi = iv[key]
        assert lo <= point[key] <= hi and lo < hi
    same = bootstrap_intervals(refs, refs, samples=50)
    assert same["rougeL"] == pytest.approx((1.0, 1.0))
    assert bootstrap_intervals(hyps, refs, samples=400) == iv  # seeded
    assert "| a |" in format_intervals({"a": iv})
