"""The from-scratch byte-level BPE: GPT-2's table reproduces tiktoken; training learns the merges."""

from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glassgpt.bpe import GPT2_EOS, BPETokenizer
from glassgpt.tokenizer import bundled_text, get_tokenizer

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def gpt2_bpe():
    return BPETokenizer.from_tiktoken_ranks()


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return get_tokenizer("gpt2")


# ---- GPT-2's table, against tiktoken ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The painting was", [464, 12036, 373]),
        ("Your journey starts with one step", [7120, 7002, 4940, 351, 530, 2239]),
        (
            "Hello, do you like tea? <|endoftext|> In the sunlit terraces",
            [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114],
        ),
    ],
)
def test_gpt2_ranks_give_tiktokens_ids(gpt2_bpe, tiktoken_gpt2, text, expected):
    assert gpt2_bpe.encode(text) == expected
    assert tiktoken_gpt2.encode(text) == expected
    assert gpt2_bpe.decode(expected) == text


def test_gpt2_table_shape(gpt2_bpe):
    assert gpt2_bpe.vocab_size == 50257
    assert gpt2_bpe.eos_id == 50256
    assert len(gpt2_bpe.tokens) == 50256
    assert gpt2_bpe.tokens[464] == b"The"
    assert gpt2_bpe.tokens[0] == b"!"  # GPT-2 ranks the single bytes printable-first, not in byte order
    assert gpt2_bpe.to_dict()["type"] == "bpe"


def test_whole_verdict_matches_tiktoken(gpt2_bpe, tiktoken_gpt2):
    text = bundled_text()
    ids = gpt2_bpe.encode(text)
    assert len(ids) == 5145
    assert ids == tiktoken_gpt2.encode(text)
    assert gpt2_bpe.decode(ids) == text


def test_whole_tiny_shakespeare_matches_tiktoken(gpt2_bpe, tiktoken_gpt2):
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(f"Tiny Shakespeare is not at {path} (the shared data folder beside the repo)")
    text = path.read_text(encoding="utf-8")
    ids = gpt2_bpe.encode(text)
    assert len(ids) == 338_025
    assert ids == tiktoken_gpt2.encode(text)


@pytest.mark.parametrize("text", ["a" * 777, "1" * 501, "=-" * 300, " \n" * 200, "ab" * 250 + "  x",
                                  "\t" * 99 + "!"])
def test_long_chunks_match_tiktoken(gpt2_bpe, tiktoken_gpt2, text):
    assert gpt2_bpe.encode(text) == tiktoken_gpt2.encode(text)


def test_chunk_cache_holds_each_distinct_chunk_once_and_changes_nothing():
    tokenizer = BPETokenizer.from_tiktoken_ranks()
    text = bundled_text()
    chunks = tokenizer.chunk_regex.findall(text)
    cached_ids = tokenizer.encode(text)
    assert len(tokenizer.cache) == len(set(chunks)) < len(chunks)
    uncached_ids = [tokenizer.rank_of[part]
                    for chunk in chunks for part in tokenizer.merge_bytes(chunk.encode())]
    assert cached_ids == uncached_ids


# Any Unicode, plus text from a small alphabet, which has far more merges to make.
MERGEABLE_TEXT = st.text(alphabet="abehnst '\n\t1209,.!?éü€", max_size=120)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=60), MERGEABLE_TEXT))
def test_any_unicode_round_trips_and_matches_tiktoken(gpt2_bpe, tiktoken_gpt2, text):
    ids = gpt2_bpe.encode_ordinary(text)
    assert gpt2_bpe.decode(ids) == text
    assert ids == tiktoken_gpt2.encoding.encode_ordinary(text)


def test_gpt2_merges_are_recovered_from_the_token_table(gpt2_bpe):
    merges = gpt2_bpe.merges()
    assert len(merges) == 50_000
    (left, right), new_id = merges[0]
    assert (left, right, new_id) == (220, 83, 256)  # GPT-2's first merge: " " + "t"
    assert gpt2_bpe.tokens[256] == b" t"
    for (left, right), new_id in merges[::997]:
        assert gpt2_bpe.tokens[left] + gpt2_bpe.tokens[right] == gpt2_bpe.tokens[new_id]
        assert left < new_id and right < new_id


def test_partial_character_decodes_like_tiktoken(gpt2_bpe, tiktoken_gpt2):
    ids = gpt2_bpe.encode("€")  # three bytes, E2 82 AC
    assert gpt2_bpe.decode_bytes(ids) == "€".encode()
    byte_e2 = gpt2_bpe.rank_of[b"\xe2"]
    assert gpt2_bpe.decode([byte_e2]) == tiktoken_gpt2.decode([byte_e2]) == "\ufffd"


# ---- training ------------------------------------------------------------------------------------


def test_training_learns_the_textbook_merges():
    # Wikipedia's example: aaabdaaabac -> ZabdZabac (Z=aa) -> ZYdZYac (Y=ab) -> XdXac (X=ZY).
    tokenizer = BPETokenizer().train("aaabdaaabac", vocab_size=260)
    assert tokenizer.tokens[256:] == [b"aa", b"ab", b"aaab"]
    # "Za" and "ab" both occur twice after the first merge: the tie goes to the smaller ids (a, b).
    assert tokenizer.merges() == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258)]
    assert tokenizer.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tokenizer.vocab_size == 260
    assert tokenizer.eos_id == 259
    assert tokenizer.decode([258, 259]) == "aaab" + GPT2_EOS


def test_training_on_the_verdict():
    text = bundled_text()
    tokenizer = BPETokenizer().train(text, vocab_size=300)
    assert tokenizer.vocab_size == 300 and len(tokenizer.tokens) == 299 and tokenizer.eos_id == 299

    # The first merge is the most frequent adjacent byte pair inside GPT-2's chunks, counted here
    # independently; pairs never cross a chunk boundary.
    pair_counts = Counter()
    for chunk in tokenizer.chunk_regex.findall(text):
        data = chunk.encode()
        pair_counts.update(pairwise(data))
    (first, second), _ = pair_counts.most_common(1)[0]
    assert tokenizer.tokens[256] == bytes([first, second]) == b" t"
    assert tokenizer.tokens[256:265] == [b" t", b"he", b" a", b"in", b" h", b" s", b" w", b" o", b" the"]
    assert all(b" " not in token[1:] for token in tokenizer.tokens)  # no token spans two words

    ids = tokenizer.encode(text)
    assert len(ids) == 14_093  # from 20,479 bytes with 43 merges
    assert tokenizer.decode(ids) == text
    assert BPETokenizer().train(text, vocab_size=300).tokens == tokenizer.tokens  # deterministic


def test_merges_learned_in_training_are_the_ones_encoding_applies(capsys):
    # Training merges pairs of ids; encoding only looks up joined bytes. The verbose log of the
    # training merges must match the merges recovered from the finished token table.
    tokenizer = BPETokenizer().train(bundled_text(), vocab_size=300, verbose=True)
    logged = []
    for line in capsys.readouterr().out.splitlines():  # "merge 1/43: 32 + 116 -> 256 ' t' (462 times)"
        left, _, right, _, new_id = line.split(": ")[1].split()[:5]
        logged.append(((int(left), int(right)), int(new_id)))
    assert len(logged) == 43
    assert logged[0] == ((32, 116), 256)
    assert tokenizer.merges() == logged


def test_special_tokens_are_kept_out_of_training_and_encode_as_one_id():
    text = ("ab<|endoftext|>" * 20) + "cab"
    tokenizer = BPETokenizer().train(text, vocab_size=259)
    assert tokenizer.tokens[256:] == [b"ab", b"cab"]
    assert not any(b"<|" in token or b"|>" in token for token in tokenizer.tokens[256:])
    assert tokenizer.encode("ab<|endoftext|>cab") == [256, 258, 257]
    assert tokenizer.encode_ordinary("<|endoftext|>") != [258]
    assert tokenizer.decode(tokenizer.encode_ordinary("<|endoftext|>")) == "<|endoftext|>"


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_trained_tokenizer_round_trips_any_unicode(text):
    tokenizer = _verdict_300()
    assert tokenizer.decode(tokenizer.encode(text)) == text


_TRAINED: list[BPETokenizer] = []


def _verdict_300() -> BPETokenizer:
    if not _TRAINED:
        _TRAINED.append(BPETokenizer().train(bundled_text(), vocab_size=300))
    return _TRAINED[0]


def test_training_errors_are_clear():
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer().train("hello", vocab_size=256)
    with pytest.raises(ValueError, match="distinct, non-empty"):
        BPETokenizer().train("hello", vocab_size=300, special_tokens=("<|a|>", "<|a|>"))
    # Each merge joins two of "hello"'s five bytes, so after 4 merges it is one token.
    with pytest.raises(ValueError, match=r"no pairs left to merge after 4 merges.*vocab_size 261 or less"):
        BPETokenizer().train("hello", vocab_size=300)
    assert BPETokenizer().train("hello", vocab_size=261).encode("hello") == [259]


# ---- files --------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    tokenizer = _verdict_300()
    path = tmp_path / "bpe.json"
    tokenizer.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[5 + 264] == '  " the",'  # token id i on line i + 6, as its text
    loaded = BPETokenizer.load(path)
    assert loaded.tokens == tokenizer.tokens
    assert loaded.special_tokens == tokenizer.special_tokens == {GPT2_EOS: 299}
    assert loaded.pattern == tokenizer.pattern
    assert loaded.to_dict() == tokenizer.to_dict()
    text = bundled_text()[:2000]
    assert loaded.encode(text) == tokenizer.encode(text)


def test_gpt2_table_survives_to_dict(gpt2_bpe, tiktoken_gpt2):
    data = gpt2_bpe.to_dict()
    # Tokens that are not whole UTF-8 characters are written as byte values.
    assert data["tokens"][gpt2_bpe.rank_of[b"\xe2\x80"]] == [0xE2, 0x80]
    assert data["tokens"][464] == "The"
    rebuilt = BPETokenizer.from_dict(data)
    assert rebuilt.tokens == gpt2_bpe.tokens and rebuilt.eos_id == 50256
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces — naïve café ☕"
    assert rebuilt.encode(text) == tiktoken_gpt2.encode(text)


def test_bad_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="more than once"):
        BPETokenizer([bytes([b]) for b in range(256)] + [b"ab", b"ab"])
    with pytest.raises(ValueError, match="lacks 1 single bytes"):
        BPETokenizer([bytes([b]) for b in range(255)])
    with pytest.raises(ValueError, match="ordinary token already uses"):
        BPETokenizer(special_tokens={GPT2_EOS: 3})
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        BPETokenizer().decode([256])
    ranks = tmp_path / "broken.tiktoken"
    ranks.write_text("IQ== 0\nnot-a-line\n", encoding="ascii")
    with pytest.raises(ValueError, match=r"broken.tiktoken:2: expected 'base64-bytes rank'"):
        BPETokenizer.from_tiktoken_ranks(ranks)


def test_checkpoints_rebuild_a_bpe_tokenizer_from_its_dict():
    from glassgpt.tokenizer import tokenizer_from_dict

    rebuilt = tokenizer_from_dict(_verdict_300().to_dict())
    assert isinstance(rebuilt, BPETokenizer)
    assert rebuilt.tokens == _verdict_300().tokens and rebuilt.eos_id == 299


def test_cli_tokenize_with_the_from_scratch_bpe(capsys):
    from glassgpt.cli import main

    assert main(["tokenize", "The painting was", "--tokenizer", "bpe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["464", "12036", "373"]
    assert "' painting'" in lines[1]
    assert lines[-1] == "3 tokens"


def test_hugging_face_files_encode_like_tiktoken(tmp_path):
    """GPT-2's table written as vocab.json + merges.txt: transformers' own GPT-2 tokenizer, reading
    them, gives tiktoken's ids (so an exported model works with AutoTokenizer and lm-eval)."""
    from transformers import AutoTokenizer

    from glassgpt.tokenizer import get_tokenizer

    BPETokenizer.from_tiktoken_ranks().save_hf(tmp_path)
    hf, reference = AutoTokenizer.from_pretrained(tmp_path), get_tokenizer("gpt2")
    texts = ["Hello world!  \n\n  It's 2024, déjà vu 🤖 x\t\ty", bundled_text()[:20_000]]
    for text in texts:
        assert hf(text)["input_ids"] == reference.encode(text)
    assert hf.eos_token_id == reference.eos_id == 50256
    assert hf.decode(reference.encode(texts[0])) == texts[0]


def test_hugging_face_files_of_a_trained_table(tmp_path):
    from transformers import AutoTokenizer

    text = bundled_text()[:5_000]
    trained = BPETokenizer().train(text, vocab_size=301)
    trained.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == trained.encode(text)
    assert len(hf) == trained.vocab_size == 301
