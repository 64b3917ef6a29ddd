"""The tokenizer: trained locally with the ``tokenizers`` library, saved as ``tokenizer.json``
next to the model. Any existing ``tokenizer.json`` works too if it has the four special tokens.

Special tokens and their fixed ids (the model's ``pad_id`` and ``special_ids``):
``[PAD]`` = 0, ``[CLS]`` = 1, ``[SEP]`` = 2, ``[UNK]`` = 3.

``bpe`` is byte-level BPE (lossless: code keeps its indentation and line breaks);
``wordpiece`` is cased BERT-style WordPiece on words and punctuation (text loses its layout:
line breaks and indentation become single spaces), whose outputs read as words.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:  # the `tokenizers` package (the "train" extra) is imported where it is used
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
TOKENIZER_FILE = "tokenizer.json"


_WHITESPACE = " \t\n\r"


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
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], max_tokens: Optional[int] = None) -> list[list[int]]:
        """Token ids of every text; with ``max_tokens``, the first ``max_tokens`` ids (exactly those
        of the whole text) from tokenizing only a prefix of each text, so that a huge text costs
        memory in proportion to ``max_tokens``, not to its length."""
        texts = list(texts)
        if max_tokens is None:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        out: list[Optional[list[int]]] = [None] * len(texts)
        todo, chars = list(range(len(texts))), 8 * max_tokens + 64
        while todo:
            pieces = [texts[i][:chars] for i in todo]
            again = []
            for i, piece, enc in zip(todo, pieces, self.tokenizer.encode_batch(pieces, add_special_tokens=False)):
                if len(piece) == len(texts[i]):
                    out[i] = enc.ids[:max_tokens]
                    continue
                # Pre-tokenizers never join text across whitespace: the tokens that end before the
                # prefix's last whitespace run are those of the whole text.
                safe = _last_whitespace_run(piece)
                ids = [token for token, (_, end) in zip(enc.ids, enc.offsets) if end <= safe]
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

        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(tok, str(path))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, kind: str = "bpe",
              min_frequency: int = 2) -> "TextTokenizer":
        """Trains a tokenizer on ``texts`` (e.g. the sources and targets of the training split)."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be > {len(SPECIAL_TOKENS)}, got {vocab_size}")
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
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, f"<trained {kind}>")
