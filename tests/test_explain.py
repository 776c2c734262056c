"""The walk-through reproduces the tutorial's numbers with glassgpt's own components.

The tutorial: the book "Build a Large Language Model (From Scratch)" (see the README).
"""

import hashlib
import io
import json
import math

import pytest
import torch

from glassgpt import GPT, get_preset
from glassgpt.cli import main
from glassgpt.explain import CL100K_URL, format_value, list_topics, print_topic, run_topic
from glassgpt.tokenizer import CharTokenizer

WORDS = ["Your", "journey", "starts", "with", "one", "step"]
TOPICS = ["tokenization", "attention", "scaling", "causal", "multihead", "layernorm", "gelu", "shortcut",
          "block", "gpt", "sampling"]


@pytest.fixture(autouse=True)
def empty_tiktoken_cache(tmp_path, monkeypatch):
    # cl100k_base must come from a local cache or not at all: point tiktoken at an empty one.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))


def steps_of(topic: str, **kwargs) -> dict[str, dict]:
    return {step["title"]: step for step in run_topic(topic, **kwargs)["steps"]}


def rounded(values, digits: int) -> list:
    if isinstance(values, list):
        return [rounded(v, digits) for v in values]
    return round(values, digits)


def test_topics_are_listed_in_teaching_order():
    assert [name for name, _ in list_topics()] == TOPICS
    assert all(title for _, title in list_topics())


def test_unknown_topic_names_the_topics():
    with pytest.raises(ValueError, match="unknown topic 'softmax'.*tokenization, attention"):
        run_topic("softmax")


def test_tokenization_counts_words_characters_and_byte_pairs():
    steps = steps_of("tokenization")
    assert [row[2] for row in steps["Words"]["table"]] == [4, 6]
    assert steps["Words"]["table"][0][1] == "Tokenization | is | fun | !"
    assert [row[1:3] for row in steps["Characters"]["table"]] == [[20, 14], [47, 18]]
    bpe = steps["Byte-pair encoding (GPT-2)"]["table"]
    assert bpe[0][1:] == ["Token | ization |  is |  fun | !", "[30642, 1634, 318, 1257, 0]", 5]
    assert bpe[1][3] == 10
    assert steps["Counts side by side"]["table"] == [
        ["words", 4, 6], ["characters", 20, 47], ["distinct characters", 14, 18], ["GPT-2 byte pairs", 5, 10]]


def test_cl100k_without_an_offline_copy_says_so_and_downloads_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "damaged-cache"
    cache.mkdir()
    # A damaged cache file would make tiktoken download again; the walk-through must not touch it.
    damaged = cache / hashlib.sha1(CL100K_URL.encode()).hexdigest()  # where tiktoken caches it
    damaged.write_bytes(b"not a ranks file")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    step = steps_of("tokenization")["cl100k_base (GPT-3.5 and GPT-4)"]
    assert step["available"] is False
    assert "No offline copy" in step["text"] and "[3404, 2065, 374, 2523, 0]" in step["text"]
    assert damaged.read_bytes() == b"not a ranks file"


def test_attention_without_weights_matches_the_tutorial():
    steps = steps_of("attention")
    assert rounded(steps['Weights for "journey"']["tensor"], 2) == [0.14, 0.24, 0.23, 0.12, 0.11, 0.16]
    assert rounded(steps['Context vector for "journey"']["tensor"], 4) == [0.4419, 0.6515, 0.5683]
    contexts = steps["All context vectors"]
    assert contexts["labels"] == WORDS and contexts["shape"] == [6, 3]
    assert rounded(contexts["tensor"][0], 4) == [0.4421, 0.5931, 0.5790]
    assert rounded(contexts["tensor"][1], 4) == [0.4419, 0.6515, 0.5683]
    all_weights = torch.tensor(steps["Every token at once"]["tensor"])
    torch.testing.assert_close(all_weights.sum(dim=-1), torch.ones(6))


def test_trainable_qkv_from_the_real_component_matches_the_tutorial():
    steps = steps_of("attention")
    output = steps["Context vectors from the values"]["tensor"]
    assert rounded(output[0], 4) == [-0.5337, -0.1051]
    assert rounded(output[1], 4) == [-0.5323, -0.1080]
    # Unmasked: every token attends to all six, so no weight is zero.
    weights = torch.tensor(steps["Scaled attention weights"]["tensor"])
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))


def test_scaling_softmax_and_variance():
    steps = steps_of("scaling")
    small, large = rounded(steps["Softmax of small and large scores"]["tensor"], 4)
    assert small == [0.1925, 0.1426, 0.2351, 0.1426, 0.2872]
    assert large == [0.0326, 0.0030, 0.1615, 0.0030, 0.8000]
    rows = steps["Dot products grow with the width"]["table"]
    assert [row[0] for row in rows] == [4, 16, 64, 256, 1024]
    for dim, raw, scaled in rows:
        assert 0.85 * dim < raw < 1.15 * dim
        assert 0.85 < scaled < 1.15
    assert rows[-1][1] > 200 * rows[0][1]


def test_causal_weights_match_the_tutorial():
    steps = steps_of("causal")
    weights = torch.tensor(steps["Causal attention weights"]["tensor"])
    assert rounded(weights[1].tolist(), 4) == [0.4833, 0.5167, 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))
    visible = torch.ones(6, 6, dtype=torch.bool).tril()
    assert bool((weights[~visible] == 0).all()) and bool((weights[visible] > 0).all())
    assert steps["The mask"]["tensor"][0] == [0, 1, 1, 1, 1, 1]
    # The first token sees only itself, so its output is its value vector.
    assert rounded(steps["Causal context vectors"]["tensor"][0], 4) == [-0.4519, 0.2216]
    dropped = torch.tensor(steps["Dropout on the weights (training only)"]["tensor"])
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * weights[kept])


def test_multihead_matches_the_tutorial():
    steps = steps_of("multihead")
    assert rounded(steps["Output"]["tensor"][0], 4) == [0.3190, 0.4858]
    shapes = dict(steps["Shapes through the layer"]["table"])
    assert shapes["attention weights per head"] == "(2, 2, 6, 6)"
    assert shapes["output projection"] == "(2, 6, 2)"
    assert steps["The fast path agrees"]["table"][0][1] < 1e-6
    for head in (1, 2):
        weights = torch.tensor(steps[f"Head {head}: attention weights"]["tensor"])
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(6))


def test_layernorm_matches_the_tutorial():
    steps = steps_of("layernorm")
    normalised = steps["Normalised"]
    assert rounded(normalised["tensor"][0], 4) == [0.5528, 1.0693, -0.0223, 0.2656, -1.8654]
    for _, mean, variance in normalised["table"]:
        assert abs(mean) < 1e-6 and abs(variance - 1) < 1e-3
    assert steps["The fast path agrees"]["table"][0][1] < 1e-5


def test_gelu_against_relu():
    step = steps_of("gelu")["GELU and ReLU"]
    table = {x: (g, r) for x, g, r in step["table"]}
    assert table[0.0] == (0.0, 0.0)
    assert round(table[1.0][0], 4) == 0.8412 and table[1.0][1] == 1.0
    assert -0.17 < table[-1.0][0] < -0.15 and table[-1.0][1] == 0.0  # GELU lets small negatives through
    plot = step["plot"]
    assert len(plot["x"]) == len(plot["series"][0]["y"]) == len(plot["series"][1]["y"]) > 20
    assert [s["name"] for s in plot["series"]] == ["GELU", "ReLU"]


def test_shortcut_gradients_match_the_tutorial():
    gradients = steps_of("shortcut")["Gradients without and with shortcuts"]["tensor"]
    # The tutorial's printed float32 values. The last float32 digit depends on the CPU's kernels (an EPYC
    # and a Xeon differ by 3 ulp at 0.2069411), so the comparison allows float32 rounding (1e-6 relative).
    without = [0.00020173587836325169, 0.00012011159560643137, 0.0007152039906941354, 0.0013988736318424344,
               0.005049645435065031]
    with_shortcuts = [0.22169792652130127, 0.20694105327129364, 0.32896995544433594, 0.2665732502937317,
                      1.3258541822433472]
    assert gradients[0] == pytest.approx(without, rel=1e-6)
    assert gradients[1] == pytest.approx(with_shortcuts, rel=1e-6)


def test_block_shapes_and_parameters_for_nano():
    steps = steps_of("block")
    shapes = dict(steps["Shapes through the block"]["table"])
    assert shapes["input"] == shapes["output"] == "(2, 4, 256)"
    assert shapes["feed-forward expand"] == "(2, 4, 1024)"
    counts = dict(steps["Parameters of one block"]["table"])
    # qkv 256 x 768 (no bias) + out_proj 256 x 256 (no bias); ff 256 x 1024 + 1024 + 1024 x 256 + 256.
    assert counts["attention"] == 256 * 768 + 256 * 256
    assert counts["feed-forward"] == 256 * 1024 + 1024 + 1024 * 256 + 256
    assert counts["total"] == counts["attention"] + counts["feed-forward"] + counts["norms"]


def test_gpt_breakdown_shapes_and_untrained_loss():
    steps = steps_of("gpt")
    breakdown = dict(steps["Where the parameters are"]["table"])
    assert breakdown["total"] == 5_846_528
    shapes = dict(steps["Shapes through the model"]["table"])
    assert shapes["token ids"] == "(2, 4)" and shapes["output head (logits)"] == "(2, 4, 10000)"
    loss_step = steps["An untrained model's loss"]
    assert round(loss_step["ln_vocab"], 2) == 9.21
    assert abs(loss_step["loss"] - math.log(10_000)) < 0.1


def test_block_and_gpt_use_a_passed_model():
    model = GPT(get_preset("tinygpt")).eval()
    shapes = dict(steps_of("gpt", model=model)["Shapes through the model"]["table"])
    assert shapes["output head (logits)"] == "(2, 4, 5)"
    block = steps_of("block", model=model)
    assert dict(block["Parameters of one block"]["table"])["total"] == sum(
        p.numel() for p in model.blocks[0].parameters())


def test_sampling_temperature_top_k_and_top_p():
    steps = steps_of("sampling")
    prompt = steps["The prompt"]["table"]
    assert [row[1] for row in prompt] == [6109, 3626, 6100, 345]  # "Every effort moves you"
    temperature = steps["Temperature"]
    low, one, high = temperature["top_probability"]
    assert low > one > high  # cooler is sharper
    probabilities = [row[3] for row in steps["Logits to probabilities"]["table"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert [row[3] for row in temperature["table"]] == probabilities
    top_k = steps["Top-k (k = 5)"]
    assert top_k["kept"] == 5 and len(top_k["table"]) == 5
    assert math.isclose(sum(row[3] for row in top_k["table"]), 1.0, rel_tol=1e-5)
    # Renormalising keeps the ratios between kept tokens.
    first, second = top_k["table"][:2]
    assert math.isclose(first[3] / second[3], first[2] / second[2], rel_tol=1e-4)
    top_p = steps["Top-p (p = 0.9)"]
    smallest_kept = min(row[2] for row in top_p["table"])
    assert 0.9 <= top_p["kept_mass"] < 0.9 + smallest_kept + 1e-4


def test_sampling_with_a_character_model_uses_its_vocabulary():
    tokenizer = CharTokenizer.from_text("hello hello")
    model = GPT(get_preset("tinygpt")).eval()
    steps = steps_of("sampling", model=model, tokenizer=tokenizer)
    assert [row[0] for row in steps["The prompt"]["table"]] == ["' '", "'e'", "'h'", "'l'"]
    assert steps["Top-p (p = 0.9)"]["kept"] <= 5
    with pytest.raises(ValueError, match="pass its tokenizer"):
        run_topic("sampling", model=model)


def test_every_topic_is_json_and_leaves_the_global_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    for name in TOPICS:
        result = run_topic(name)
        assert json.loads(json.dumps(result)) == result
        assert result["topic"] == name and result["steps"]
        for step in result["steps"]:
            assert step["title"] and step["text"]
            if "tensor" in step:
                assert list(torch.tensor(step["tensor"]).shape) == step["shape"]
    assert torch.equal(torch.rand(3), expected)


def test_format_value():
    assert format_value(5_846_528) == "5,846,528"
    assert format_value(0.48576289) == "0.4858"
    assert format_value(3.8e-05) == "3.80e-05"
    assert format_value(0.00020174, digits=8) == "0.00020174"
    assert format_value("(2, 4)") == "(2, 4)"


def test_print_topic_shows_the_numbers():
    from rich.console import Console

    out = io.StringIO()
    print_topic(run_topic("multihead"), Console(file=out, width=120))
    text = out.getvalue()
    assert "Multi-head attention" in text and "0.3190" in text and "0.4858" in text


def test_cli_explain(capsys):
    assert main(["explain", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == TOPICS
    assert main(["explain", "layernorm"]) == 0
    assert "0.5528" in capsys.readouterr().out
    assert main(["explain", "causal", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert round(result["steps"][1]["tensor"][1][1], 4) == 0.5167
    assert main(["explain", "nonsense"]) == 2
    assert "unknown topic 'nonsense'" in capsys.readouterr().err


def test_cli_explain_runs_a_saved_model(tmp_path, capsys):
    from glassgpt.weights import save_model

    save_model(GPT(get_preset("tinygpt")), tmp_path / "tiny",
               tokenizer=CharTokenizer.from_text("hello hello"))
    assert main(["explain", "gpt", "--json", "--model", str(tmp_path / "tiny")]) == 0
    steps = {s["title"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert dict(steps["Where the parameters are"]["table"])["total"] == 2_453
    assert main(["explain", "sampling", "--model", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
