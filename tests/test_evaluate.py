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
