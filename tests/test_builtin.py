"""The built-in model's tokenizer knows every word of the scene world as one token, as built and as shipped."""

from __future__ import annotations

from transformers import CLIPTokenizer

from adapters.base import BUILTIN_DIR
from trainer.builtin.builder import build_tokenizer
from trainer.builtin.scenes import vocabulary


def _split_words(tokenizer: CLIPTokenizer) -> dict[str, list[str]]:
    """The scene words the tokenizer cuts into more than one token, with their pieces."""
    pieces = {word: tokenizer.tokenize(word) for word in vocabulary()}
    return {word: p for word, p in pieces.items() if len(p) != 1}


def test_built_tokenizer_gives_each_scene_word_one_token():
    assert _split_words(build_tokenizer()) == {}


def test_built_tokenizer_splits_other_words_into_known_pieces():
    """A trigger word or a typo reaches the text encoder as pieces, not as an unknown token: nothing is lost."""
    tokenizer = build_tokenizer()
    text = "glowline, a Red Hexagon 42!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == text.lower().replace(" ", "")


def test_shipped_tokenizer_gives_each_scene_word_one_token():
    """A word added to the scene world without rebuilding and retraining the model fails here."""
    shipped = CLIPTokenizer.from_pretrained(BUILTIN_DIR, subfolder="tokenizer")
    split = _split_words(shipped)
    assert split == {}, (
        f"{BUILTIN_DIR / 'tokenizer'} cuts these scene words into pieces: {split}; the built-in model was made "
        "before they were added: rebuild and pretrain it (trainer/builtin/pretrain.py) or drop the words"
    )
