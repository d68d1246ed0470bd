"""Write a small text classifier the way transformers saves one: `python -m
examples.huggingface.make_model OUT_DIR`. It stands in for your fine-tuning script, which ends
the same way: `model.save_pretrained(OUT_DIR)` and `tokenizer.save_pretrained(OUT_DIR)`.

Everything is built here, offline: a WordPiece tokenizer (the `tokenizers` library) whose
vocabulary is the words of a few sentences and the characters to spell any other word, made in a
fixed order so every run gives the same token ids, and a small BERT with random weights (its
labels mean nothing)."""

from __future__ import annotations

import string
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

TEXTS = ["what a lovely day", "this is terrible", "the model serves text", "lazy servers rest"]
LABELS = {0: "negative", 1: "positive"}
MAX_TOKENS = 128  # the position embeddings: the tokenizer truncates longer texts to this
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_model(directory: Path, *, hidden: int = 64, layers: int = 2) -> Path:
    """A BertForSequenceClassification and its tokenizer, saved into `directory`."""
    torch.manual_seed(0)
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {
        word
        for text in TEXTS
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    characters = string.ascii_lowercase + string.digits + string.punctuation
    vocab = [*SPECIALS, *characters, *(f"##{c}" for c in characters)]
    vocab += sorted(words - set(vocab))
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")],
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MAX_TOKENS,
    )
    config = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=MAX_TOKENS,
        id2label=LABELS,
        label2id={name: i for i, name in LABELS.items()},
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    for path in directory.iterdir():  # readable by Lambda's user wherever it is copied
        path.chmod(0o644)
    return directory


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sentiment")
    print(f"wrote {make_model(out)}")
