"""The tokenizer: trained locally with the ``tokenizers`` library, saved as ``tokenizer.json``
next to the model. Any existing ``tokenizer.json`` works too if it has the four special tokens.

Special tokens and their fixed ids (the model's ``pad_id`` and ``special_ids``):
``[PAD]`` = 0, ``[CLS]`` = 1, ``[SEP]`` = 2, ``[UNK]`` = 3.

``bpe`` is byte-level BPE (lossless: code keeps its indentation and line breaks);
``wordpiece`` is cased BERT-style WordPiece on words and punctuation (text loses its layout:
line breaks and indentation become single spaces), whose outputs read as words.

Bounded work on any text: a run of more than ``MAX_WORD_CHARS`` non-whitespace characters (a
minified file, a base64 blob, a hostile line) is tokenized in pieces of that many characters, so
that no word handed to the tokenizer is longer (the BPE of one huge word takes time and memory
far beyond its length, and the tokenizers library can panic on it); tokenizer training also
sees at most ``MAX_TRAIN_TEXT_CHARS`` characters of each text.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:  # the `tokenizers` package (the "train" extra) is imported where it is used
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
TOKENIZER_FILE = "tokenizer.json"


_WHITESPACE = " \t\n\r"
MAX_WORD_CHARS = 256            # longer runs of non-whitespace are cut into pieces this long
MAX_TRAIN_TEXT_CHARS = 1 << 20  # characters of one text that tokenizer training sees
_LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


def _cuts(text: str) -> list[int]:
    """Where ``text`` is cut: every ``MAX_WORD_CHARS`` characters into each longer non-whitespace run
    (positions counted from the run's start, so a prefix of a text is cut where the text is)."""
    return [m.start() + k for m in _LONG_WORD.finditer(text) for k in range(MAX_WORD_CHARS, m.end() - m.start(),
                                                                               MAX_WORD_CHARS)]


def _pieces(text: str) -> tuple[list[str], list[int]]:
    """``text`` cut at ``_cuts``: the pieces and the offset of each."""
    starts = [0] + _cuts(text)
    ends = starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(starts, ends)], starts


def _last_whitespace_run(text: str) -> int:
    """Start of the last run of ASCII whitespace in ``text`` (0 when there is none)."""
    j = max(text.rfind(c) for c in _WHITESPACE)
    if j < 0:
        return 0
    while j > 0 and text[j - 1] in _WHITESPACE:
        j -= 1
    return j


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    unk: int


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the special ids the packing and the model need."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>") -> None:
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        if missing:
            raise ValueError(f"{source}: the tokenizer lacks the special tokens {missing}; moediffuseq needs "
                             f"{list(SPECIAL_TOKENS)}")
        self.tokenizer = tokenizer
        # "[SEP]" typed in a text is text, never the special token (nor are the other three)
        self.tokenizer.encode_special_tokens = True
        self.special = SpecialIds(*ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._encode_cut([text])[0][0]

    def _encode_cut(self, texts: Sequence[str]) -> list[tuple[list[int], list[int], int]]:
        """(ids, end offset of each id, the last cut) of every text, its long words cut (``_pieces``)."""
        cut = [_pieces(t) for t in texts]
        encodings = iter(self.tokenizer.encode_batch([p for pieces, _ in cut for p in pieces],
                                                     add_special_tokens=False))
        out = []
        for pieces, starts in cut:
            ids, ends = [], []
            for start in starts:
                enc = next(encodings)
                ids += enc.ids
                ends += [start + end for _, end in enc.offsets]
            out.append((ids, ends, starts[-1]))
        return out

    def encode_batch(self, texts: Sequence[str], max_tokens: Optional[int] = None) -> list[list[int]]:
        """Token ids of every text; with ``max_tokens``, the first ``max_tokens`` ids (exactly those
        of the whole text) from tokenizing only a prefix of each text, so that a huge text costs
        memory in proportion to ``max_tokens``, not to its length."""
        texts = list(texts)
        if max_tokens is None:
            return [ids for ids, _, _ in self._encode_cut(texts)]
        out: list[Optional[list[int]]] = [None] * len(texts)
        todo, chars = list(range(len(texts))), 8 * max_tokens + 64
        while todo:
            pieces = [texts[i][:chars] for i in todo]
            again = []
            for i, piece, (piece_ids, ends, last_cut) in zip(todo, pieces, self._encode_cut(pieces)):
                if len(piece) == len(texts[i]):
                    out[i] = piece_ids[:max_tokens]
                    continue
                # Pre-tokenizers never join text across whitespace, and the pieces of a cut word are
                # tokenized apart: the tokens that end before the prefix's last whitespace run (or
                # its last cut) are those of the whole text.
                safe = max(_last_whitespace_run(piece), last_cut)
                ids = [token for token, end in zip(piece_ids, ends) if end <= safe]
                if len(ids) >= max_tokens:
                    out[i] = ids[:max_tokens]
                else:
                    again.append(i)
            todo, chars = again, chars * 4
        return out  # type: ignore[return-value]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextTokenizer":
        """From a tokenizer.json file, or a directory holding one."""
        from tokenizers import Tokenizer

        from moediffuseq.limits import MAX_TOKENIZER_BYTES, check_file_size

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        check_file_size(path, "tokenizer file", MAX_TOKENIZER_BYTES)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(tok, str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, kind: str = "bpe",
              min_frequency: int = 2) -> "TextTokenizer":
        """Trains a tokenizer on ``texts`` (e.g. the sources and targets of the training split): the
        first ``MAX_TRAIN_TEXT_CHARS`` characters of each, its long words cut as ``encode`` cuts them."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        from moediffuseq.limits import MAX_VOCAB_SIZE

        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
        if vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be <= {MAX_VOCAB_SIZE:_}, got {vocab_size:_}")
        if kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token="[UNK]"))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                          special_tokens=list(SPECIAL_TOKENS),
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        elif kind == "wordpiece":
            tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece()
            trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                                special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        else:
            raise ValueError(f"tokenizer kind must be 'bpe' or 'wordpiece', got {kind!r}")
        tok.train_from_iterator((p for t in texts for p in _pieces(t[:MAX_TRAIN_TEXT_CHARS])[0]), trainer=trainer)
        return cls(tok, f"<trained {kind}>")
