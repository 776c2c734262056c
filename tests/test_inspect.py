"""The inside views (glassgpt.inspect) against independent code on random weights, in fp32.

transformers' GPT2LMHeadModel with the same weights is the reference: its `output_hidden_states`
and forward hooks on its blocks, attention/MLP modules and each attention's `c_proj` do each
experiment by hand, one run per cell. TransformerLens (a test-only dependency) does the same
through its own caching, hooks and `patching` module, and its HookedTransformer-style weight
processing (folded, centred LayerNorms) gives the logit lens along a different path.
"""

import copy
import importlib.metadata
import json

import numpy as np
import pytest
import torch

from glassgpt import GPT, get_preset
from glassgpt.cli import main
from glassgpt.inspect import (
    ablate_heads,
    attribute_heads,
    embedding_map,
    logit_lens,
    logit_lens_top,
    patch_residual,
    residual_contributions,
    target_logit,
    top_neurons,
)
from glassgpt.tokenizer import get_tokenizer
from glassgpt.weights import load_model, save_model

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

ATOL = 1e-4
IDS = [11, 42, 7, 99, 3, 64, 5, 18]
CORRUPT = [11, 42, 8, 99, 3, 64, 77, 18]  # two tokens changed: positions 2 and 6
TARGET = 5


def random_hf_model(vocab_size: int = 120, seed: int = 0) -> GPT2LMHeadModel:
    """A small random GPT-2 with weights large enough that patching and ablation move the logits."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=48, n_head=4, n_layer=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.mul_(6.0)
            elif "ln" in name and name.endswith("weight"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers') holding the same random weights."""
    hf = random_hf_model()
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    ours, _ = load_model(directory)
    return ours, hf


def hf_target_logit(hf, ids, hooks=()) -> float:
    """transformers' logit of TARGET at the last position with `hooks` [(module, pre-hook)] in place."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0, -1, TARGET].item()
    finally:
        for handle in handles:
            handle.remove()


def assert_clean(model: GPT, training: bool = False):
    """No hook left behind, training flags as before."""
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert module.training is training


# ---------------------------------------------------------------- against transformers

def test_logit_lens_equals_transformers_hidden_states_through_ln_f_and_lm_head(pair):
    ours, hf = pair
    lens = logit_lens(ours, IDS)
    assert lens.shape == (4, len(IDS), 120) and lens.dtype == torch.float32
    with torch.no_grad():
        hidden = hf(torch.tensor([IDS]), output_hidden_states=True).hidden_states
        assert len(hidden) == 4
        # transformers hands back the last hidden state after ln_f already: only the head remains.
        expected = [hf.lm_head(hf.transformer.ln_f(h)) for h in hidden[:-1]] + [hf.lm_head(hidden[-1])]
    expected = torch.log_softmax(torch.cat(expected), dim=-1)
    torch.testing.assert_close(lens, expected, atol=ATOL, rtol=0)
    # The last row is the model's own output, exactly.
    with torch.no_grad():
        assert torch.equal(lens[-1], torch.log_softmax(ours(torch.tensor([IDS])), dim=-1)[0])
    values, indices = logit_lens_top(ours, IDS, k=3)
    best = lens.topk(3, dim=-1)
    assert torch.equal(indices, best.indices) and torch.equal(values, best.values)
    assert_clean(ours)


def test_residual_contributions_equal_the_norms_of_transformers_attn_and_mlp_outputs(pair):
    ours, hf = pair
    found = residual_contributions(ours, IDS)
    assert found["names"][:3] == ["embeddings", "block 0 attention", "block 0 feed-forward"]
    outputs = []
    handles = []
    for block in hf.transformer.h:
        handles.append(block.attn.register_forward_hook(lambda m, a, out: outputs.append(out[0])))
        handles.append(block.mlp.register_forward_hook(lambda m, a, out: outputs.append(out)))
    with torch.no_grad():
        embeddings = hf(torch.tensor([IDS]), output_hidden_states=True).hidden_states[0]
    for handle in handles:
        handle.remove()
    expected = torch.stack([t[0].norm(dim=-1) for t in [embeddings, *outputs]])
    assert found["norms"].shape == (7, len(IDS))
    torch.testing.assert_close(found["norms"], expected, atol=ATOL, rtol=0)


def test_patch_residual_equals_transformers_with_a_pre_hook_on_each_block(pair):
    ours, hf = pair
    result = patch_residual(ours, IDS, CORRUPT, TARGET)
    assert result.shape == (3, len(IDS))
    clean_inputs = {}
    grab = [(block, lambda m, args, i=i: clean_inputs.__setitem__(i, args[0].clone()))
            for i, block in enumerate(hf.transformer.h)]
    hf_target_logit(hf, IDS, grab)
    expected = torch.empty(3, len(IDS))
    for layer, block in enumerate(hf.transformer.h):
        for position in range(len(IDS)):
            def patch(module, args, layer=layer, position=position):
                x = args[0].clone()
                x[:, position] = clean_inputs[layer][:, position]
                return (x, *args[1:])

            expected[layer, position] = hf_target_logit(hf, CORRUPT, [(block, patch)])
    torch.testing.assert_close(result, expected, atol=ATOL, rtol=0)
    # Where the texts agree, entering block 0 changes nothing; at a changed token it restores the clean
    # token, and at the last block's input only the last position still matters.
    corrupt_logit, clean_logit = target_logit(ours, CORRUPT, TARGET), target_logit(ours, IDS, TARGET)
    assert result[0, 0] == pytest.approx(corrupt_logit, abs=ATOL)
    assert result[-1, -1] != pytest.approx(corrupt_logit, abs=1e-3)
    assert abs(result[0, 2] - corrupt_logit) > 1e-3 and clean_logit != pytest.approx(corrupt_logit, abs=1e-3)
    assert_clean(ours)


def test_ablate_heads_equals_transformers_with_the_head_slice_of_c_proj_zeroed(pair):
    ours, hf = pair
    result = ablate_heads(ours, IDS, TARGET)
    assert result.shape == (3, 4)
    head_dim = 48 // 4
    expected = torch.empty(3, 4)
    for layer, block in enumerate(hf.transformer.h):
        for head in range(4):
            def silence(module, args, head=head):
                context = args[0].clone()
                context[..., head * head_dim:(head + 1) * head_dim] = 0
                return (context,)

            expected[layer, head] = hf_target_logit(hf, IDS, [(block.attn.c_proj, silence)])
    torch.testing.assert_close(result, expected, atol=ATOL, rtol=0)
    assert (result - target_logit(ours, IDS, TARGET)).abs().max() > 1e-2  # the heads matter here
    assert_clean(ours)


def test_attribute_heads_equals_the_same_estimate_by_autograd_on_transformers(pair):
    ours, hf = pair
    head_dim = 48 // 4
    contexts = []
    handles = [block.attn.c_proj.register_forward_pre_hook(lambda m, args: contexts.append(args[0]))
               for block in hf.transformer.h]
    try:
        logit = hf(torch.tensor([IDS])).logits[0, -1, TARGET]
        grads = torch.autograd.grad(logit, contexts)
    finally:
        for handle in handles:
            handle.remove()
    expected = torch.stack([logit.detach() - (g * c.detach())[0].reshape(len(IDS), 4, head_dim)
                            .sum(dim=(0, 2)) for g, c in zip(grads, contexts, strict=True)])
    result = attribute_heads(ours, IDS, TARGET)
    torch.testing.assert_close(result, expected, atol=ATOL, rtol=0)
    assert_clean(ours)
    assert all(parameter.grad is None for parameter in ours.parameters())  # no weight gradient formed


def test_attribute_heads_ranks_heads_as_the_exact_ablation_does(pair):
    ours, _ = pair
    baseline = target_logit(ours, IDS, TARGET)
    exact = ablate_heads(ours, IDS, TARGET) - baseline
    estimate = attribute_heads(ours, IDS, TARGET) - baseline
    # Measured 0.989 here; a sign error or a wrong head slice gives a correlation near 0 or below.
    assert torch.corrcoef(torch.stack([exact.flatten(), estimate.flatten()]))[0, 1] > 0.95
    assert exact.flatten().abs().argmax() == estimate.flatten().abs().argmax()  # the head that matters most
    # A model whose weights need no gradients (frozen, as a served model may be) gives the same.
    frozen = copy.deepcopy(ours).requires_grad_(False)
    torch.testing.assert_close(attribute_heads(frozen, IDS, TARGET) - baseline, estimate, atol=1e-6, rtol=0)


def test_top_neurons_equal_transformers_mlp_activations(pair):
    ours, hf = pair
    found = top_neurons(ours, IDS, 1, k=4, per_neuron=3)
    activations = []
    handle = hf.transformer.h[1].mlp.act.register_forward_hook(lambda m, a, out: activations.append(out))
    with torch.no_grad():
        hf(torch.tensor([IDS]))
    handle.remove()
    values = activations[0][0]                                          # (T, 192)
    peaks = values.max(dim=0).values
    assert [n["neuron"] for n in found["neurons"]] == peaks.topk(4).indices.tolist()
    for neuron in found["neurons"]:
        column = values[:, neuron["neuron"]]
        assert neuron["peak"] == pytest.approx(peaks[neuron["neuron"]].item(), abs=ATOL)
        assert neuron["positions"] == column.topk(3).indices.tolist()
        np.testing.assert_allclose(neuron["activations"], column.topk(3).values.numpy(), atol=ATOL)
        assert neuron["token_ids"] == [IDS[p] for p in neuron["positions"]]


def test_embedding_map_equals_numpy_pca_and_brute_force_cosine_neighbours(pair):
    ours, _ = pair
    found = embedding_map(ours, IDS + IDS[:2], k=4)                     # duplicates are shown once
    for name, table, rows in (("tokens", ours.tok_emb.weight, IDS), ("positions", ours.pos_emb.weight,
                                                                        list(range(32)))):
        part = found[name]
        assert part["ids"] == rows
        matrix = table.detach().double().numpy()
        vectors = matrix[rows] - matrix[rows].mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(vectors.T @ vectors)  # ascending
        expected = vectors @ eigenvectors[:, ::-1][:, :2]
        xy = part["xy"].double().numpy()
        for axis in range(2):  # an axis's sign is a convention: compare up to it
            sign = np.sign(xy[:, axis] @ expected[:, axis])
            np.testing.assert_allclose(xy[:, axis], sign * expected[:, axis], atol=ATOL)
        np.testing.assert_allclose(part["explained"].numpy(), eigenvalues[::-1][:2] / eigenvalues.sum(),
                                   atol=1e-5)
        unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
        cosine = unit[rows] @ unit.T
        cosine[np.arange(len(rows)), rows] = -np.inf
        np.testing.assert_array_equal(part["neighbours"].numpy(), np.argsort(-cosine, axis=1)[:, :4])
        np.testing.assert_allclose(part["similarity"].numpy(), np.sort(cosine, axis=1)[:, ::-1][:, :4],
                                   atol=1e-5)
    default = embedding_map(ours)["tokens"]["ids"]
    assert default == list(range(120))  # a vocabulary under 500 tokens: all of it


# ---------------------------------------------------------------- against TransformerLens

def toy_hf_tokenizer(vocab_size: int):
    """A word-level tokenizer built in memory, so TransformerLens loads nothing from the Hub."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t0", bos_token="t0", unk_token="t0",
                                   pad_token="t0", name_or_path="toy", add_bos_token=True)


@pytest.fixture(scope="module")
def bridges(pair):
    """TransformerLens over copies of the transformers model: as loaded, and with HookedTransformer's
    weight processing (LayerNorm folded into the next layer, writing weights and unembedding centred)."""
    pytest.importorskip("transformer_lens")
    if int(importlib.metadata.version("transformer-lens").split(".")[0]) < 4:
        pytest.skip("TransformerLens 4 or later (its TransformerBridge) is needed")
    from transformer_lens import TransformerBridge

    _, hf = pair
    plain, processed = (TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), device="cpu",
                                                            tokenizer=toy_hf_tokenizer(120))
                        for _ in range(2))
    processed.enable_compatibility_mode(disable_warnings=True)
    return plain, processed


def test_logit_lens_equals_transformer_lens_with_folded_layer_norms(pair, bridges):
    ours, _ = pair
    _, processed = bridges
    with torch.no_grad():
        _, cache = processed.run_with_cache(torch.tensor([IDS]))
        streams = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(3)]
        streams.append(cache["blocks.2.hook_resid_post"])
        expected = torch.cat([torch.log_softmax(processed.unembed(processed.ln_final(s)), dim=-1)
                              for s in streams])
    torch.testing.assert_close(logit_lens(ours, IDS), expected, atol=ATOL, rtol=0)


def test_patch_residual_equals_transformer_lens_act_patch_resid_pre(pair, bridges):
    from transformer_lens import patching

    ours, _ = pair
    plain, _ = bridges
    with torch.no_grad():
        _, clean_cache = plain.run_with_cache(torch.tensor([IDS]))
        expected = patching.get_act_patch_resid_pre(plain, torch.tensor([CORRUPT]), clean_cache,
                                                    lambda logits: logits[0, -1, TARGET])
    torch.testing.assert_close(patch_residual(ours, IDS, CORRUPT, TARGET), torch.as_tensor(expected),
                               atol=ATOL, rtol=0)


def test_ablate_heads_equals_transformer_lens_hook_z_zeroed(pair, bridges):
    ours, _ = pair
    plain, _ = bridges
    expected = torch.empty(3, 4)
    for layer in range(3):
        for head in range(4):
            def zero(z, hook, head=head):
                z[:, :, head] = 0                                       # z: (batch, pos, head, d_head)
                return z

            with torch.no_grad():
                logits = plain.run_with_hooks(torch.tensor([IDS]),
                                              fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
            expected[layer, head] = logits[0, -1, TARGET]
    torch.testing.assert_close(ablate_heads(ours, IDS, TARGET), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- any glassgpt model

def random_glassgpt(name: str = "tinygpt", **overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(get_preset(name, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def small_gpt2() -> GPT:
    return random_glassgpt("gpt2", vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2).eval()


def test_post_ln_model_patching_and_ablation_agree_with_weight_surgery():
    """TinyGPT (post-LN, no final norm): patching block 0 at the one changed token gives the clean run;
    zeroing a head equals zeroing its columns of the output projection in a copy of the model."""
    model = random_glassgpt(vocab_size=20, context_length=8, n_layers=2).train()  # the views: eval, and back
    vocab = model.config.vocab_size
    clean, corrupt = [1, 2, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6]
    result = patch_residual(model, clean, corrupt, 7)
    assert_clean(model, training=True)
    model.eval()
    assert result[0, 2] == pytest.approx(target_logit(model, clean, 7), abs=1e-5)
    assert result[0, 0] == pytest.approx(target_logit(model, corrupt, 7), abs=1e-5)
    ablated = ablate_heads(model, clean, 7)
    head_dim = model.config.head_dim
    for layer in range(model.config.n_layers):
        for head in range(model.config.n_heads):
            surgery = copy.deepcopy(model)
            with torch.no_grad():
                surgery.blocks[layer].attn.out_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
            assert ablated[layer, head] == pytest.approx(target_logit(surgery, clean, 7), abs=1e-5)
    lens = logit_lens(model, clean)
    assert lens.shape == (model.config.n_layers + 1, 6, vocab)
    assert torch.equal(lens[-1], torch.log_softmax(model(torch.tensor([clean])), dim=-1)[0])


def test_views_chunk_long_texts_into_several_batches(monkeypatch):
    model = small_gpt2()
    clean, corrupt = list(range(16)), list(range(16))
    corrupt[3] = 40
    whole = patch_residual(model, clean, corrupt, 7), ablate_heads(model, clean, 7)
    monkeypatch.setattr("glassgpt.inspect.TOKENS_PER_BATCH", 40)   # 2 copies of 16 tokens per pass
    chunked = patch_residual(model, clean, corrupt, 7), ablate_heads(model, clean, 7)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_classifier_reads_through_its_class_head():
    model = random_glassgpt("gpt2", vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                            n_classes=3, labels=("a", "b", "c"), tie_weights=False).eval()
    ids = [3, 4, 5, 6]
    lens = logit_lens(model, ids)
    assert lens.shape == (3, 4, 3)
    assert torch.equal(lens[-1], torch.log_softmax(model(torch.tensor([ids])), dim=-1)[0])
    assert ablate_heads(model, ids, np.int64(2)).shape == (2, 4)  # any integer type
    with pytest.raises(ValueError, match=r"not a class of this classifier: 0\.\.2 \(a, b, c\)"):
        patch_residual(model, ids, ids, 3)


def test_bad_input_is_refused_before_any_work():
    model = small_gpt2()
    cases = [
        (lambda: patch_residual(model, [1, 2, 3], [1, 2], 4), "equal token counts: 3 and 2"),
        (lambda: patch_residual(model, [1, 2], [1, 2], 50),
         r"target id 50 is outside the vocabulary \(0\.\.49\)"),
        (lambda: ablate_heads(model, [1, 2], -1), "outside the vocabulary"),
        (lambda: ablate_heads(model, [1, 2], 1.0), "must be an integer"),
        (lambda: logit_lens(model, []), "empty"),
        (lambda: logit_lens(model, torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (lambda: logit_lens(model, list(range(17))), "17 tokens exceed the model's context length of 16"),
        (lambda: logit_lens(model, [1, 99]), r"token id 99 is outside the vocabulary"),
        (lambda: logit_lens(model, torch.ones(2, 3, dtype=torch.long)), "one text"),
        (lambda: logit_lens(model, torch.ones(3)), "integers"),
        (lambda: logit_lens(model, [1, True]), "integers"),
        (lambda: ablate_heads(model, [1, 2], True), "must be an integer"),
        (lambda: attribute_heads(model, [1, 2], 50), "outside the vocabulary"),
        (lambda: attribute_heads(model, [], 1), "empty"),
        (lambda: residual_contributions(model, [-1]), "outside the vocabulary"),
        (lambda: top_neurons(model, [1, 2], 2), r"block must be 0\.\.1"),
        (lambda: top_neurons(model, "text", 0), "needs its tokenizer"),
        (lambda: embedding_map(model, [1], k=0), "k must be a positive integer"),
        (lambda: logit_lens_top(model, [1], k=0), "k must be a positive integer"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert_clean(model)


# ---------------------------------------------------------------- glassgpt inspect

@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A random character-level model saved as a checkpoint directory (a vocabulary of 12)."""
    tokenizer = get_tokenizer("char", text="the cat sat on a mat")
    torch.manual_seed(0)
    model = GPT(get_preset("gpt2", vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=32,
                           n_heads=4, n_layers=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("char") / "model"
    save_model(model, directory, tokenizer)
    return str(directory), load_model(directory)[0].eval(), tokenizer


def inspect_json(capsys, *args) -> dict:
    assert main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_numbers_equal_the_library(char_model, capsys):
    directory, model, tokenizer = char_model
    ids = tokenizer.encode("the cat")
    lens = inspect_json(capsys, "the cat", "--model", directory, "--view", "logit-lens", "--top", "2")
    values, indices = logit_lens_top(model, ids, 2)
    assert [t["text"] for t in lens["tokens"]] == list("the cat")
    assert lens["rows"] == ["embeddings", "block 0", "block 1"]
    assert [[[c["id"] for c in cell] for cell in row] for row in lens["top"]] == indices.tolist()
    np.testing.assert_allclose([[[c["logprob"] for c in cell] for cell in row] for row in lens["top"]],
                               values.numpy(), atol=1e-6)

    target = tokenizer.encode("a")[0]
    patch = inspect_json(capsys, "the cat", "--model", directory, "--view", "patch", "--corrupt", "the mat",
                         "--target", "a")
    assert patch["target"] == {"id": target, "text": "a"}
    expected = patch_residual(model, ids, tokenizer.encode("the mat"), target)
    np.testing.assert_allclose(patch["logits"], expected, atol=1e-6)
    assert patch["clean_logit"] == pytest.approx(target_logit(model, ids, target), abs=1e-6)

    heads = inspect_json(capsys, "the cat", "--model", directory, "--view", "heads")
    greedy = int(logit_lens(model, ids)[-1, -1].argmax())  # no --target: the model's own next token
    assert heads["target"]["id"] == greedy
    np.testing.assert_allclose(heads["logits"], ablate_heads(model, ids, greedy), atol=1e-6)
    assert heads["method"] == "exact"
    estimated = inspect_json(capsys, "the cat", "--model", directory, "--view", "heads",
                             "--method", "attribution")
    assert estimated["method"] == "attribution"
    np.testing.assert_allclose(estimated["logits"], attribute_heads(model, ids, greedy), atol=1e-6)

    residual = inspect_json(capsys, "the cat", "--model", directory, "--view", "residual")
    expected = residual_contributions(model, ids)
    assert residual["names"] == expected["names"]
    np.testing.assert_allclose(residual["norms"], expected["norms"], atol=1e-6)

    neurons = inspect_json(capsys, "the cat", "--model", directory, "--view", "neurons", "--block", "0")
    assert neurons["neurons"][0]["neuron"] == top_neurons(model, ids, 0)["neurons"][0]["neuron"]
    first = neurons["neurons"][0]
    assert first["tokens"] == [tokenizer.decode([i]) for i in first["token_ids"]]

    embeddings = inspect_json(capsys, "the cat", "--model", directory, "--view", "embeddings")
    expected = embedding_map(model, ids)
    assert embeddings["token_map"]["ids"] == expected["tokens"]["ids"]
    np.testing.assert_allclose(embeddings["token_map"]["xy"], expected["tokens"]["xy"], atol=1e-6)
    assert embeddings["token_map"]["texts"] == tokenizer.token_strings(expected["tokens"]["ids"])
    assert len(embeddings["position_map"]["xy"]) == 32
    no_text = inspect_json(capsys, "", "--model", directory, "--view", "embeddings", "--top", "2")
    assert no_text["tokens"] == [] and no_text["token_map"]["ids"] == list(range(tokenizer.vocab_size))
    assert len(no_text["token_map"]["neighbours"][0]) == 2


def test_cli_tables_and_refusals(char_model, capsys):
    directory, _, _ = char_model
    for view in ("logit-lens", "heads", "embeddings", "neurons", "residual"):
        assert main(["inspect", "the cat", "--model", directory, "--view", view]) == 0
        assert "block 1" in capsys.readouterr().out or view == "embeddings"  # a row or column name
    assert main(["inspect", "the cat", "--model", directory, "--view", "patch", "--corrupt", "the mat"]) == 0
    assert "patch" in capsys.readouterr().out.lower()
    refusals = [
        (["--view", "patch"], "--corrupt"),
        (["--view", "patch", "--corrupt", "the"], "equal token counts"),
        (["--view", "heads", "--target", "at"], "one token"),
        (["--view", "neurons", "--block", "5"], "block must be 0..1"),
        (["--view", "heads", "--top", "0"], "top must be a positive integer"),
        (["--model", directory + "/missing"], "no model at"),
    ]
    for extra, message in refusals:
        assert main(["inspect", "the cat", "--model", directory, *extra]) == 2
        assert message in capsys.readouterr().err
