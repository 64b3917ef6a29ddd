"""Data: DiffuSeq jsonl files, built-in corpora, the tokenizer and sequence packing."""
from moediffuseq.data.corpora import CORPORA, build_corpus
from moediffuseq.data.dataset import Seq2SeqDataset
from moediffuseq.data.jsonl import DataFormatError, Example, read_jsonl, split_path, write_jsonl
from moediffuseq.data.packing import PackedBatch, pack, pack_source, truncate_pair
from moediffuseq.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, TextTokenizer

__all__ = [
    "CORPORA", "DataFormatError", "Example", "PackedBatch", "SPECIAL_TOKENS", "Seq2SeqDataset", "TOKENIZER_FILE",
    "TextTokenizer", "build_corpus", "pack", "pack_source", "read_jsonl", "split_path", "truncate_pair",
    "write_jsonl",
]
