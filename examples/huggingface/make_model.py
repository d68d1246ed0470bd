"""Write a small text classifier the way transformers saves one: `python -m
examples.huggingface.make_model OUT_DIR`. It stands in for your fine-tuning script, which ends
the same way: `model.save_pretrained(OUT_DIR)` and `tokenizer.save_pretrained(OUT_DIR)`.

Everything is built here, offline: a WordPiece tokenizer trained by the `tokenizers` library on
a few sentences, and a small BERT with random weights (its labels mean nothing)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

TEXTS = ["what a lovely day", "this is terrible", "the model serves text", "lazy servers rest"]
LABELS = {0: "negative", 1: "positive"}


def make_model(directory: Path, *, hidden: int = 64, layers: int = 2) -> Path:
    """A BertForSequenceClassification and its tokenizer, saved into `directory`."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        TEXTS * 20, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
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
    )
    config = BertConfig(
        vocab_size=fast.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
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
