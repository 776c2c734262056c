import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glassgpt import CharTokenizer, get_tokenizer
from glassgpt.bpe import BPETokenizer
from glassgpt.tokenizer import bundled_text, tokenizer_from_dict


def test_char_tokenizer_on_hello_hello():
    tokenizer = CharTokenizer.from_text("hello hello")
    assert tokenizer.vocab_size == 5
    assert tokenizer.encode("hello hello") == [2, 1, 3, 3, 4, 0, 2, 1, 3, 3, 4]
    assert tokenizer.decode([2, 1, 3, 3, 4]) == "hello"
    assert tokenizer_from_dict(tokenizer.to_dict()).encode("hell") == [2, 1, 3, 3]


def test_char_tokenizer_unknown_character_is_a_clear_error():
    with pytest.raises(ValueError, match="'z' is not in"):
        CharTokenizer.from_text("hello").encode("zoo")


@pytest.mark.parametrize("text, ids", [
    ("The painting was", [464, 12036, 373]),
    ("Your journey starts with one step", [7120, 7002, 4940, 351, 530, 2239]),
    ("Hello, do you like tea? <|endoftext|> In the sunlit terraces",
     [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]),
])
def test_gpt2_ids_are_the_real_ones(text, ids):
    tokenizer = get_tokenizer("gpt2")
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_gpt2_vocabulary_and_end_of_text():
    tokenizer = get_tokenizer("gpt2")
    assert tokenizer.vocab_size == 50257
    assert tokenizer.eos_id == 50256
    assert tokenizer.encode("<|endoftext|>") == [50256]


def test_the_verdict_is_shipped_byte_for_byte_and_has_5145_tokens():
    text = bundled_text("the-verdict.txt")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == (
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f")
    ids = get_tokenizer("gpt2").encode(text)
    assert len(ids) == 5145
    assert ids[:10] == [40, 367, 2885, 1464, 1807, 3619, 402, 271, 10899, 2138]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_gpt2_round_trips_arbitrary_unicode(text):
    tokenizer = get_tokenizer("gpt2")
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gpt2_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="out of range"):
        get_tokenizer("gpt2").decode([50257])


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


TEXT = "héllo wörld, 猫!"
TOKENIZERS = {
    "char": lambda: CharTokenizer.from_text(TEXT),
    "gpt2": lambda: get_tokenizer("gpt2"),
    "bpe": lambda: BPETokenizer.from_tiktoken_ranks(),
}


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_every_tokenizer_offers_bytes_token_strings_and_a_description(kind):
    tokenizer = TOKENIZERS[kind]()
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode_bytes(ids) == TEXT.encode("utf-8")
    pieces = tokenizer.token_strings(ids)
    assert len(pieces) == len(ids) and pieces[0] == "h"
    assert tokenizer_from_dict(tokenizer.to_dict()).encode(TEXT) == ids
    with pytest.raises(ValueError, match="out of range|not in this tokenizer's vocabulary"):
        tokenizer.token_strings([tokenizer.vocab_size])


def test_token_strings_show_each_token_with_partial_characters_as_replacement():
    chars = CharTokenizer.from_text(TEXT)
    assert chars.token_strings(chars.encode(TEXT)) == list(TEXT)
    gpt2 = get_tokenizer("gpt2")
    ids = gpt2.encode(TEXT)  # 猫 is three UTF-8 bytes in three tokens, none a character alone
    expected = ["h", "é", "llo", " w", "ör", "ld", ",", " \ufffd", "\ufffd", "\ufffd", "!"]
    assert gpt2.token_strings(ids) == expected
    assert BPETokenizer.from_tiktoken_ranks().token_strings(ids) == expected  # from scratch, same
    assert gpt2.decode_bytes(ids[7:10]) == " 猫".encode()
