"""A word-level HF tokenizer for the embedded task, built in code with `tokenizers`.

Digits and operators are single-character tokens, words carry their leading
spaces (``" then "``), ``" \\boxed{"`` is one token. Decoding fuses the tokens
back, so ``decode(encode(text)) == text`` for every task text. The result is
a real `transformers` fast tokenizer: it saves with ``save_pretrained`` and
loads back with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPLIT_PATTERN = r" ?[A-Za-z]+ ?| ?\\boxed\{|\d|[^\sA-Za-z\d]|\s"
# Single characters always in the vocabulary, so that any short arithmetic text encodes without <unk>.
ALPHABET = tuple("0123456789+-*/=(),.?:;{}") + (" ",)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer whose vocabulary covers `corpus`.

    The vocabulary is: the three special tokens (``<pad>`` = 0, ``<eos>`` = 1,
    ``<unk>`` = 2), the fixed `ALPHABET`, then every other pre-token of the
    corpus in order of first appearance.
    """
    pre = _pre_tokenizer()
    vocab: dict[str, int] = {}
    for tok in (PAD, EOS, UNK, *ALPHABET):
        vocab.setdefault(tok, len(vocab))
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  clean_up_tokenization_spaces=False, padding_side="left")
    return tok
