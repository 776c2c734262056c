"""LoRA (glassgpt.lora), checked against its formula and against Hugging Face's peft.

peft is the independent implementation: the same random GPT-2 is loaded into transformers and into
glassgpt, both get LoRA with the same starting A and B, and one AdamW step must agree.
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from glassgpt.config import GPTConfig
from glassgpt.lora import (
    DEFAULT_TARGETS,
    METADATA_KEY,
    LoRALinear,
    apply_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    save_adapters,
    trainable_parameters,
)
from glassgpt.model import GPT
from glassgpt.weights import load_model, save_model

SMALL = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
IDS = torch.tensor([[5, 17, 3, 88, 42, 9, 61, 0, 33, 12], [7, 7, 90, 1, 2, 64, 30, 11, 55, 96]])


def small_gpt(seed: int = 0, config: GPTConfig = SMALL) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@torch.no_grad()
def randomise_adapters(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """B starts at zero; give it (and A) random values so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.A.copy_(torch.randn(module.A.shape, generator=generator) * std)
            module.B.copy_(torch.randn(module.B.shape, generator=generator) * std)


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------- the layer

def test_lora_linear_starts_as_the_base_layer_and_computes_w_plus_scaled_ba():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = LoRALinear(base, rank=3, alpha=6)
    x = torch.randn(4, 5, 12)
    assert layer.A.shape == (3, 12) and layer.B.shape == (20, 3)
    assert torch.equal(layer.B, torch.zeros(20, 3))
    assert torch.equal(layer(x), base(x))  # B = 0: the adapted layer starts where the base was
    with torch.no_grad():
        layer.B.normal_()
    # The formula written as one matrix: (W + (alpha / r) B A) x + b, with alpha / r = 2.
    weight = base.weight + 2.0 * layer.B @ layer.A
    expected = x @ weight.T + base.bias
    assert (layer(x) - expected).abs().max() <= 1e-5
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.A.requires_grad and layer.B.requires_grad
    assert "rank=3, alpha=6" in repr(layer)


def test_a_is_initialised_like_peft_kaiming_uniform_with_a_sqrt5():
    torch.manual_seed(123)
    layer = LoRALinear(nn.Linear(64, 40), rank=4, alpha=8)
    # The same draw peft makes for lora_A (shape (r, in)), from the same random state.
    torch.manual_seed(123)
    nn.Linear(64, 40)
    reference = torch.empty(4, 64)
    nn.init.kaiming_uniform_(reference, a=math.sqrt(5))
    assert torch.equal(layer.A, reference)
    assert layer.A.abs().max() <= 1 / math.sqrt(64)  # the bound of kaiming-uniform with a = sqrt(5)


def test_default_alpha_is_the_rank():
    layer = LoRALinear(nn.Linear(16, 16), rank=4)
    assert layer.alpha == 4 and layer.scaling == 1.0


def test_adapter_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(8, 16)
    expected = layer.base(x) + x @ layer.A.T @ layer.B.T
    layer.eval()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), expected, atol=1e-3)


@pytest.mark.parametrize(("rank", "alpha", "message"), [
    (0, 8, "rank must be a positive integer"),
    (-2, 8, "rank must be a positive integer"),
    (2.5, 8, "rank must be a positive integer"),
    (True, 8, "rank must be a positive integer"),
    (17, 8, r"rank 17 is larger than the layer: a \(24 x 16\) matrix has rank at most 16"),
    (4, 0, "alpha must be a positive number"),
    (4, -1.0, "alpha must be a positive number"),
    (4, float("nan"), "alpha must be a positive number"),
])
def test_lora_linear_refuses_bad_settings(rank, alpha, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(16, 24), rank=rank, alpha=alpha)


# ---------------------------------------------------------------- applying it to a GPT

def test_gpt2_small_at_rank_8_trains_1_179_648_parameters():
    # On the meta device: shapes without memory or initialisation time.
    with torch.device("meta"):
        model = apply_lora(GPT.from_preset("gpt2"), rank=8)
    # Per block: r * (in + out) for qkv (768 -> 2304), out_proj (768 -> 768), expand (768 -> 3072),
    # contract (3072 -> 768).
    per_block = 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))
    assert trainable_parameters(model) == 12 * per_block == 1_179_648
    assert len(model.lora_settings.modules) == 48
    # With a classification head trained whole: plus its 768 x 2 weights.
    with torch.device("meta"):
        classifier = GPT.from_preset("gpt2")
        classifier.out_head = nn.Linear(768, 2, bias=False)
        apply_lora(classifier, rank=8, trainable=("out_head",))
    assert trainable_parameters(classifier) == 1_179_648 + 768 * 2


def test_apply_lora_wraps_the_four_targets_and_freezes_everything_else():
    model = apply_lora(small_gpt(), rank=4, alpha=8)
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(f"blocks.{i}.{part}" for i in range(2)
                             for part in ("attn.qkv", "attn.out_proj", "ff.expand", "ff.contract"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in wrapped for ab in "AB"}
    assert model.lora_settings.targets == DEFAULT_TARGETS
    assert model.lora_settings.alpha == 8.0


def test_a_training_step_changes_only_the_adapters():
    model = apply_lora(small_gpt(), rank=4).train()
    randomise_adapters(model)
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(IDS[:, :-1], targets=IDS[:, 1:]).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    before = {name: p.clone() for name, p in lora_state_dict(model).items()}
    optimizer.step()
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert all(not torch.equal(p, before[name]) for name, p in lora_state_dict(model).items())


def test_trainable_modules_and_custom_targets():
    model = apply_lora(small_gpt(), rank=2, targets=("attn.qkv",), trainable=("final_norm", "out_head"))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # The head is tied to the token embedding, which named_parameters names it by.
    assert trainable == {"blocks.0.attn.qkv.A", "blocks.0.attn.qkv.B", "blocks.1.attn.qkv.A",
                         "blocks.1.attn.qkv.B", "final_norm.scale", "final_norm.shift", "tok_emb.weight"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": 33}, r"rank 33 is larger than the layer 'blocks.0.attn.qkv'"),
    ({"rank": 4, "alpha": 0}, "alpha must be a positive number"),
    ({"rank": 4, "targets": ("qkv", "c_attn")}, r"targets \['c_attn'\] match no module"),
    ({"rank": 4, "targets": ()}, "at least one target"),
    ({"rank": 4, "targets": ("tok_emb",)}, "is a Embedding, not a linear layer"),
    ({"rank": 4, "targets": ("out_head",)}, "cannot wrap the output head"),
    ({"rank": 4, "trainable": ("classifier",)}, r"trainable modules \['classifier'\] match no module"),
])
def test_apply_lora_refuses_bad_settings_and_leaves_the_model_unchanged(kwargs, message):
    model = small_gpt()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        apply_lora(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


def test_apply_lora_twice_is_refused():
    model = apply_lora(small_gpt(), rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2)


# ---------------------------------------------------------------- merging

def test_merged_model_equals_the_unmerged_one_and_is_an_ordinary_gpt(tmp_path):
    original_keys = set(small_gpt().state_dict())
    model = apply_lora(small_gpt(), rank=4, alpha=16)
    randomise_adapters(model)
    adapted = logits(model)
    assert (adapted - logits(small_gpt())).abs().max() > 1e-2  # the adapters really change the output
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not hasattr(model, "lora_settings")
    assert set(model.state_dict()) == original_keys
    assert (logits(model) - adapted).abs().max() <= 1e-5
    # Every loader sees an ordinary model.
    save_model(model, tmp_path / "merged")
    loaded, _ = load_model(tmp_path / "merged")
    assert (logits(loaded) - adapted).abs().max() <= 1e-5


def test_merge_in_bf16_adds_the_update_in_fp32():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32).to(torch.bfloat16), rank=4, alpha=4)
    with torch.no_grad():
        layer.B.normal_(std=0.01)
    merged = layer.merged()
    expected = (layer.base.weight.float() + layer.B.float() @ layer.A.float()).to(torch.bfloat16)
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.weight, expected)


# ---------------------------------------------------------------- adapter files

def test_adapters_round_trip(tmp_path):
    model = apply_lora(small_gpt(), rank=4, alpha=12, targets=("qkv", "expand"), trainable=("final_norm",))
    randomise_adapters(model)
    with torch.no_grad():
        model.final_norm.shift.normal_()
    expected = logits(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    with safe_open(str(path), framework="pt") as file:
        settings = json.loads(file.metadata()[METADATA_KEY])
        names = set(file.keys())
    assert settings["rank"] == 4 and settings["alpha"] == 12.0
    assert settings["targets"] == ["qkv", "expand"] and settings["trainable"] == ["final_norm"]
    assert names == set(lora_state_dict(model))
    assert len(names) == 2 * 2 * 2 + 2  # 2 blocks x 2 targets x (A, B) + the final norm's scale, shift

    fresh = load_adapters(small_gpt(), path)
    assert (logits(fresh) - expected).abs().max() == 0
    assert fresh.lora_settings == model.lora_settings
    assert trainable_parameters(fresh) == trainable_parameters(model)
    # A model that already has the same adapters just takes the values.
    again = apply_lora(small_gpt(), rank=4, alpha=12, targets=("qkv", "expand"), trainable=("final_norm",))
    assert (logits(load_adapters(again, path)) - expected).abs().max() == 0


def test_adapters_of_a_tied_trainable_head_round_trip(tmp_path):
    model = apply_lora(small_gpt(), rank=2, trainable=("out_head",))
    with torch.no_grad():
        model.out_head.weight.add_(0.5)
    path = save_adapters(model, tmp_path / "a.safetensors")
    assert (logits(load_adapters(small_gpt(), path)) - logits(model)).abs().max() == 0


def test_save_adapters_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapters(small_gpt(), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def assert_refused_unchanged(model, path, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_adapters(model, path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not hasattr(model, "lora_settings")


def test_load_adapters_refuses_what_does_not_fit(tmp_path):
    path = save_adapters(apply_lora(small_gpt(), rank=4), tmp_path / "a.safetensors")
    deeper = small_gpt(config=SMALL.replace(n_layers=3))
    assert_refused_unchanged(deeper, path, r"match 12 layers here, 8 in the file .*only here: \['blocks.2")
    wider = small_gpt(config=SMALL.replace(emb_dim=48))
    assert_refused_unchanged(wider, path,
                             r"shapes differ\): blocks.0.attn.qkv.A: file \(4, 32\), model \(4, 48\)")
    assert_refused_unchanged(small_gpt(), tmp_path / "missing.safetensors", "no adapter file")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    assert_refused_unchanged(small_gpt(), tmp_path / "plain.safetensors", "holds no glassgpt LoRA settings")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    assert_refused_unchanged(small_gpt(), tmp_path / "junk.safetensors", "not a safetensors file")
    # A model with other adapters is not overwritten.
    other = apply_lora(small_gpt(), rank=2)
    with pytest.raises(ValueError, match="already has different LoRA adapters"):
        load_adapters(other, path)
    assert other.lora_settings.rank == 2


def test_a_failed_save_leaves_the_good_file(tmp_path, monkeypatch):
    model = apply_lora(small_gpt(), rank=2)
    path = save_adapters(model, tmp_path / "a.safetensors")
    good = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("glassgpt.lora.save_file", broken)
    randomise_adapters(model)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# ---------------------------------------------------------------- against peft

# peft's module names on GPT2LMHeadModel -> ours.
PEFT_TO_OURS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out_proj", "mlp.c_fc": "ff.expand",
                "mlp.c_proj": "ff.contract"}
PEFT_NAME = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$")


def hf_and_ours(tmp_path, dtype=torch.float32):
    """The same random GPT-2 in transformers (with peft's LoRA) and in glassgpt (with ours)."""
    peft = pytest.importorskip("peft")  # the test-only peer (the dev extra)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_head=4, n_layer=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():  # biases and norms away from 0 and 1
            parameter.add_(torch.randn_like(parameter) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf")
    assert (logits(ours) - hf(IDS).logits).abs().max() <= 1e-4  # the same base model

    lora_config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, fan_in_fan_out=True,
                                  target_modules=["c_attn", "c_proj", "c_fc"])
    theirs = peft.get_peft_model(hf, lora_config).to(dtype).eval()
    ours = apply_lora(ours, rank=4, alpha=12).to(dtype).eval()
    # The same nonzero starting A and B in both (B is zeros at first; random makes the step non-trivial).
    generator = torch.Generator().manual_seed(7)
    pairs = 0
    with torch.no_grad():
        for (their_a, my_a), (their_b, my_b) in pairs_of_adapters(theirs, ours):
            assert their_a.shape == my_a.shape and their_b.shape == my_b.shape
            their_a.copy_(torch.randn(their_a.shape, generator=generator, dtype=dtype) * 0.3)
            their_b.copy_(torch.randn(their_b.shape, generator=generator, dtype=dtype) * 0.3)
            my_a.copy_(their_a)
            my_b.copy_(their_b)
            pairs += 1
    assert pairs == 8  # 2 blocks x 4 targets
    return theirs, ours


# peft calls a transformers method that transformers 5 deprecates; not ours to fix.
PEFT_WARNINGS = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def pairs_of_adapters(theirs, ours):
    for name, module in theirs.named_modules():
        match = PEFT_NAME.search(name)
        if match and hasattr(module, "lora_A"):
            mine = ours.get_submodule(f"blocks.{match[1]}.{PEFT_TO_OURS[match[2]]}")
            yield (module.lora_A["default"].weight, mine.A), (module.lora_B["default"].weight, mine.B)


@PEFT_WARNINGS
def test_a_step_of_our_lora_equals_a_step_of_peft(tmp_path):
    # float64, so that the comparison sees the algorithm and not float32 rounding (Adam's first step
    # is about lr * sign(gradient), which would amplify a rounding difference in a tiny gradient).
    theirs, ours = hf_and_ours(tmp_path, torch.float64)
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]
    before = logits(ours)
    assert (before - theirs(input_ids=IDS).logits).abs().max() <= 1e-10

    def loss_of(logits_):
        return F.cross_entropy(logits_[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())

    # Our training loss path (model(ids, targets=...), which computes it in float32) gives the same number.
    with torch.no_grad():
        assert abs(ours(IDS[:, :-1], targets=IDS[:, 1:]).item() - loss_of(before).item()) <= 1e-6

    results = []
    for model, forward in ((theirs, lambda: theirs(input_ids=IDS).logits), (ours, lambda: ours(IDS))):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                      weight_decay=0.1)
        loss = loss_of(forward())
        loss.backward()
        optimizer.step()
        results.append(loss.item())
        model.eval()
    their_loss, our_loss = results
    assert abs(their_loss - our_loss) <= 1e-10
    for (their_a, my_a), (their_b, my_b) in pairs_of_adapters(theirs, ours):
        assert (their_a - my_a).abs().max() <= 1e-10
        assert (their_b - my_b).abs().max() <= 1e-10
    after = logits(ours)
    assert (after - before).abs().max() > 1e-2  # the step did something
    with torch.no_grad():
        assert (after - theirs(input_ids=IDS).logits).abs().max() <= 1e-10


@PEFT_WARNINGS
def test_a_float32_step_of_our_lora_matches_peft_within_1e_5(tmp_path):
    theirs, ours = hf_and_ours(tmp_path)
    losses = []
    for model, forward in ((theirs, lambda: theirs(input_ids=IDS).logits), (ours, lambda: ours(IDS))):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss = F.cross_entropy(forward()[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5
    with torch.no_grad():
        assert (logits(ours) - theirs(input_ids=IDS).logits).abs().max() <= 1e-5


@PEFT_WARNINGS
def test_our_merged_model_equals_peft_merge_and_unload(tmp_path):
    theirs, ours = hf_and_ours(tmp_path)
    with torch.no_grad():
        adapted = theirs(input_ids=IDS).logits
    assert (logits(ours) - adapted).abs().max() <= 1e-5
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours)
    with torch.no_grad():
        assert (logits(ours) - merged_theirs(IDS).logits).abs().max() <= 1e-5
        assert (logits(ours) - adapted).abs().max() <= 1e-5
