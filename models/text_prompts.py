"""Text prompts: the phrases a text-prompted model (sam3, grounded-sam) looks for, and the
categories they become. Torch-free: the driver checks them before any work.

Each phrase is one category. Its id is its place in the list (1..N), or, given a category
file, the id of the category of that name there (every phrase must name one). A run's
phrases are part of its model options (`text`), so a changed phrase list is a changed
model identity: `--resume` and `relabel` treat it as another model.

Phrases are counted in tokens on the driver with the checkpoint's own tokenizer
(tokenizer.json, read by the `tokenizers` library, no torch): a phrase (or, for a model that
reads all phrases as one prompt, the joined prompt) longer than the model's text encoder
takes is refused there, not truncated in every actor.
"""

from __future__ import annotations

from collections.abc import Sequence

from .categories import Category

TOKENIZER_FILE = "tokenizer.json"

# Sam3Processor tokenizes every prompt to this many tokens (its __call__: padding to max_length 32).
SAM3_TEXT_TOKENS = 32

# Grounding DINO's prompt form: "car. person. bicycle." (transformers' docs and processor).
PHRASE_SEPARATOR = ". "


def split_text(text: str) -> list[str]:
    """`--text "car, person, bicycle"` → ['car', 'person', 'bicycle'] (a phrase holding a
    comma comes from a text file, one phrase per line)."""
    return [phrase.strip() for phrase in text.split(",")]


def read_text_file(content: str, source: str) -> list[str]:
    """A text file's phrases: one per line; blank lines and lines starting with # skipped.
    ValueError naming `source` when it has none."""
    phrases = [line.strip() for line in content.splitlines()]
    phrases = [phrase for phrase in phrases if phrase and not phrase.startswith("#")]
    if not phrases:
        raise ValueError(f"text file {source} holds no phrases (one per line)")
    return phrases


def joined_prompt(phrases: Sequence[str]) -> str:
    """All phrases as one prompt, as Grounding DINO reads them: 'car. person. bicycle.'"""
    return PHRASE_SEPARATOR.join(phrases) + "."


def check_phrases(phrases: Sequence[str]) -> None:
    """ValueError unless `phrases` is a non-empty list of distinct, non-blank strings."""
    if not phrases:
        raise ValueError("the phrase list is empty: give the phrases to find (--text 'car, person')")
    blank = [index for index, phrase in enumerate(phrases) if not phrase.strip()]
    if blank:
        raise ValueError(f"phrase {blank[0] + 1} of {len(phrases)} is empty")
    seen = set()
    for phrase in phrases:
        if phrase.strip().lower() in seen:
            raise ValueError(f"phrase {phrase!r} is given twice")
        seen.add(phrase.strip().lower())


def text_categories(text: Sequence[str] | None, file_categories: list[Category] | None = None) -> list[Category]:
    """The run's categories, one thing category per phrase: ids 1..N in the order of `text`,
    or, with a category file's categories, the id of the category each phrase names
    (ValueError naming the phrases that name none). Without `text`, the category file's
    categories, each name a phrase."""
    if text is None:
        if not file_categories:
            raise ValueError("no phrases: give --text, --text-file or a --category-file")
        return [Category(category.id, category.name, True) for category in file_categories]
    if file_categories is None:
        return [Category(index + 1, phrase, True) for index, phrase in enumerate(text)]
    by_name = {category.name.lower(): category for category in file_categories}
    missing = [phrase for phrase in text if phrase.lower() not in by_name]
    if missing:
        raise ValueError(
            f"the category file names no category {', '.join(map(repr, missing))} "
            f"(its categories: {', '.join(c.name for c in file_categories[:20])})"
        )
    return [Category(by_name[phrase.lower()].id, phrase, True) for phrase in text]


def too_long(tokenizer_json: str, prompts: Sequence[str], max_tokens: int) -> str | None:
    """Why a prompt does not fit `max_tokens` tokens, naming the first that does not; None
    when all fit."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    for prompt in prompts:
        count = len(tokenizer.encode(prompt).ids)
        if count > max_tokens:
            return f"the text prompt {prompt!r} is {count} tokens long; the model's text encoder takes {max_tokens}"
    return None


def byte_tokenizer(begin: str = "<|startoftext|>", end: str = "<|endoftext|>"):
    """`--weights random`'s tokenizer (a `tokenizers.Tokenizer`): one token per UTF-8 byte of
    the lower-cased text, between the special tokens `begin` and `end` (ids 256 and 257,
    also the padding). Real checkpoints bring their own (tokenizer.json)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({begin: 256, end: 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{begin} $A {end}", special_tokens=[(begin, 256), (end, 257)]
    )
    tokenizer.add_special_tokens([begin, end])
    return tokenizer


# Grounding DINO's text encoder takes this many tokens (GroundingDinoConfig's max_text_len
# default, the published checkpoints' and `--weights random`'s).
GROUNDING_DINO_TEXT_TOKENS = 256

# BERT's ids of the tokens Grounding DINO's modeling code reads: it splits a prompt into
# phrases at [CLS], [SEP], "." and "?" (modeling_grounding_dino.py SPECIAL_TOKENS); [PAD] 0.
BERT_SPECIAL_IDS = {"[PAD]": 0, "[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
BERT_BYTE_VOCAB_SIZE = 1030


def bert_byte_tokenizer():
    """`byte_tokenizer` on BERT's ids, for a random model that reads them (grounded-sam's
    Grounding DINO): the same tokens — one per UTF-8 byte of the lower-cased text, between
    [CLS] and [SEP], so a prompt counts as many as `byte_tokenizer()` counts — with [PAD] 0,
    [CLS] 101, [SEP] 102, "." 1012 and "?" 1029 (BERT_SPECIAL_IDS), the other bytes on free
    ids below BERT_BYTE_VOCAB_SIZE."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    base = byte_tokenizer("[CLS]", "[SEP]")
    free = iter(sorted(set(range(BERT_BYTE_VOCAB_SIZE)) - set(BERT_SPECIAL_IDS.values())))
    vocab = {s: BERT_SPECIAL_IDS[s] if s in BERT_SPECIAL_IDS else next(free) for s in sorted(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({name: BERT_SPECIAL_IDS[name] for name in ("[PAD]", "[CLS]", "[SEP]")})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = base.normalizer, base.pre_tokenizer, base.decoder
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", BERT_SPECIAL_IDS["[CLS]"]), ("[SEP]", BERT_SPECIAL_IDS["[SEP]"])]
    )
    tokenizer.add_special_tokens(["[PAD]", "[CLS]", "[SEP]"])
    return tokenizer
