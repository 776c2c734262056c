"""Instruction fine-tuning: the tutorial's template, data checks, split, collate and masking; a small
model that learns to answer its training instructions exactly; the saved checkpoint and its template.

The tutorial: the book "Build a Large Language Model (From Scratch)", chapter 7 (see the README)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from glassgpt.bpe import BPETokenizer
from glassgpt.config import GPTConfig
from glassgpt.instruct import (
    IGNORE_INDEX,
    InstructionTemplate,
    InstructSettings,
    collate,
    finetune_instruct,
    load_instructions,
    load_template,
    respond,
    respond_many,
    split_instructions,
    tokenize_instructions,
)
from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer, get_tokenizer
from glassgpt.weights import load_model

EOS = 50256
FIRST_OUTPUT = 'The spelling of the given phrase "freind" is incorrect, the correct spelling is "friend".'
PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.")


@pytest.fixture(scope="module")
def data() -> list[dict]:
    return load_instructions("bundled:instruction-data.json")


# ---------------------------------------------------------------- the template


def test_template_is_the_tutorials_alpaca_prompt_with_and_without_input():
    template = InstructionTemplate()
    with_input = {"instruction": "Evaluate the following phrase by transforming it into the spelling given.",
                  "input": "freind --> friend", "output": FIRST_OUTPUT}
    assert template.format_prompt(with_input["instruction"], with_input["input"]) == (
        PREAMBLE + "\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling "
        "given.\n\n### Input:\nfreind --> friend\n\n### Response:\n")
    assert template.format_example(with_input) == template.format_prompt(
        with_input["instruction"], with_input["input"]) + with_input["output"]
    assert template.format_prompt("Name a primary color.") == (
        PREAMBLE + "\n\n### Instruction:\nName a primary color.\n\n### Response:\n")
    no_input = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
    assert template.format_example(no_input) == (
        PREAMBLE + "\n\n### Instruction:\nName a primary color.\n\n### Response:\nRed.")


def test_template_round_trips_through_a_dict_and_refuses_unknown_fields():
    custom = InstructionTemplate(preamble="Answer briefly.", response_header="### Answer:", name="brief")
    assert InstructionTemplate.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    assert InstructionTemplate.from_dict({}) == InstructionTemplate()
    with pytest.raises(ValueError, match="unknown instruction template fields: colour"):
        InstructionTemplate.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="must be strings: preamble"):
        InstructionTemplate.from_dict({"preamble": 3})


# ---------------------------------------------------------------- data


def test_bundled_data_is_the_tutorials_1100_examples(data):
    assert len(data) == 1100
    assert data[0] == {"instruction": "Evaluate the following phrase by transforming it into the spelling "
                                      "given.", "input": "freind --> friend", "output": FIRST_OUTPUT}
    assert sum(1 for e in data if e["input"]) == 325


def test_jsonl_is_read_line_by_line_with_input_optional(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi."}\n\n'
                    '{"instruction": "Add.", "input": "2 + 2", "output": "4", "source": "ignored"}\n')
    assert load_instructions(path) == [{"instruction": "Say hi.", "input": "", "output": "Hi."},
                                       {"instruction": "Add.", "input": "2 + 2", "output": "4"}]


@pytest.mark.parametrize("name, text, message", [
    ("empty.json", "", r"empty\.json is empty"),
    ("blank.jsonl", "  \n\n", r"blank\.jsonl is empty"),
    ("cut.json", '[{"instruction": "a", "output": "b"},\n', r"cut\.json is not valid JSON: .* line 2"),
    ("none.json", "[]", r"none\.json holds no examples"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": \n',
     r"bad\.jsonl, line 3: not valid JSON"),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}]',
     r"missing\.json, entry 2: missing 'output' \(has 'instruction', 'input'\)"),
    ("missing.jsonl", '{"instruction": "a", "output": "b"}\n{"output": "b"}\n',
     r"missing\.jsonl, line 2: missing 'instruction'"),
    ("number.json", '[{"instruction": "a", "output": 4}]',
     r"number\.json, entry 1: 'output' must be a string"),
    ("list.json", '[["a", "b"]]', r"list\.json, entry 1: expected an object"),
    ("blank_instruction.json", '[{"instruction": " ", "output": "b"}]',
     r"blank_instruction\.json, entry 1: the instruction is empty"),
])
def test_bad_data_files_are_named_with_the_entry_or_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_instructions(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        load_instructions(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="no bundled data set named 'nothing.json'"):
        load_instructions("bundled:nothing.json")


def test_split_is_the_tutorials_85_5_10_and_seeded(data):
    tutorial = split_instructions(data, seed=None)
    assert tutorial.counts() == {"train": 935, "val": 55, "test": 110}
    # seed=None is the tutorial's own cut of the file: train, then test, then validation.
    assert tutorial.train == data[:935] and tutorial.test == data[935:1045] and tutorial.val == data[1045:]

    seeded = split_instructions(data, seed=123)
    assert seeded.counts() == {"train": 935, "val": 55, "test": 110}
    assert seeded == split_instructions(data, seed=123)
    assert seeded.train != split_instructions(data, seed=124).train
    assert seeded.train != tutorial.train
    # A partition: every example exactly once.
    picked = sorted(id(e) for part in seeded for e in part)
    assert picked == sorted(id(e) for e in data)
    assert split_instructions(data[:20]).counts() == {"train": 17, "val": 1, "test": 2}


# ---------------------------------------------------------------- tokens, batches, masking


def test_collate_gives_the_tutorials_example_tensors():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=EOS)
    assert inputs.tolist() == [[0, 1, 2, 3, 4],
                               [5, 6, EOS, EOS, EOS],
                               [7, 8, 9, EOS, EOS]]
    assert targets.tolist() == [[1, 2, 3, 4, EOS],
                                [6, EOS, -100, -100, -100],
                                [8, 9, EOS, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    # The tutorial's allowed_max_length cuts the padded batch: the same as slicing it.
    short_inputs, short_targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=EOS, max_length=3)
    assert torch.equal(short_inputs, inputs[:, :3]) and torch.equal(short_targets, targets[:, :3])


def test_collate_masks_by_position_so_an_end_of_text_inside_a_text_stays_a_target():
    inputs, targets = collate([[3, EOS, 4], [5]], pad_id=EOS)
    assert inputs.tolist() == [[3, EOS, 4], [5, EOS, EOS]]
    assert targets.tolist() == [[EOS, 4, EOS], [EOS, -100, -100]]


def test_mask_prompt_ignores_exactly_the_prompts_tokens(data):
    tokenizer, template = get_tokenizer("gpt2"), InstructionTemplate()
    examples = [data[0], data[1], data[5]]  # with and without an input, of different lengths
    tokenized, truncated = tokenize_instructions(examples, tokenizer, template, max_length=1024)
    assert truncated == 0
    ids = [t.ids for t in tokenized]
    prompt_lengths = [t.prompt_length for t in tokenized]
    _, plain = collate(ids, EOS)
    inputs, masked = collate(ids, EOS, prompt_lengths=prompt_lengths)
    for row, (example, prompt_length) in enumerate(zip(examples, prompt_lengths, strict=True)):
        prompt = template.format_prompt(example["instruction"], example["input"])
        assert prompt_length == len(tokenizer.encode(prompt))
        assert tokenizer.decode(inputs[row, :prompt_length].tolist()) == prompt
        # Targets 0 .. P-2 predict the prompt's ids 1 .. P-1: exactly those are ignored ...
        assert (masked[row, :prompt_length - 1] == IGNORE_INDEX).all()
        assert torch.equal(masked[row, prompt_length - 1:], plain[row, prompt_length - 1:])
        # ... so what the loss still counts is the response and one end of text.
        counted = masked[row][masked[row] != IGNORE_INDEX].tolist()
        assert tokenizer.decode(counted) == example["output"] + "<|endoftext|>"
        assert tokenizer.decode(plain[row][plain[row] != IGNORE_INDEX].tolist()) == \
            tokenizer.decode(ids[row][1:]) + "<|endoftext|>"


def test_truncation_is_counted_and_keeps_real_next_tokens_as_targets(data):
    tokenizer, template = get_tokenizer("gpt2"), InstructionTemplate()
    full, _ = tokenize_instructions(data[:4], tokenizer, template, max_length=1024)
    lengths = [len(t.ids) for t in full]
    limit = sorted(lengths)[1]  # longer than one example, shorter than (or as long as) the others
    tokenized, truncated = tokenize_instructions(data[:4], tokenizer, template, max_length=limit)
    assert truncated == sum(n > limit for n in lengths) >= 2
    inputs, targets = collate([t.ids for t in tokenized], EOS, max_length=limit)
    assert inputs.shape[1] == limit
    for row, (short, whole) in enumerate(zip(tokenized, full, strict=True)):
        if short.truncated:  # the last target is the real next token, not an end of text
            assert inputs[row].tolist() == whole.ids[:limit]
            assert targets[row].tolist() == whole.ids[1:limit + 1]
        else:
            assert targets[row, len(whole.ids) - 1] == EOS


def test_the_models_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context_length=8, emb_dim=16, n_heads=2, n_layers=1)).eval()
    inputs, targets = collate([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]], pad_id=39, prompt_lengths=[2, 1, 3])
    with torch.no_grad():
        loss = model(inputs, targets=targets)
        log_probs = F.log_softmax(model(inputs).double(), dim=-1)
    counted = [(b, t) for b in range(3) for t in range(inputs.shape[1]) if targets[b, t] != -100]
    expected = -sum(log_probs[b, t, targets[b, t]] for b, t in counted) / len(counted)
    assert len(counted) == 4 + 2 + 1
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------- settings and refusals


def test_settings_carry_the_issues_flags_with_the_tutorials_defaults():
    names = {f.name for f in dataclasses.fields(InstructSettings)}
    flags = {"mask_prompt", "max_length", "epochs", "max_steps", "lr", "batch_size", "weight_decay", "seed",
             "precision", "device", "lora_rank", "lora_alpha"}
    assert flags <= names
    defaults = InstructSettings()
    assert (defaults.lr, defaults.weight_decay, defaults.epochs, defaults.batch_size) == (5e-5, 0.1, 2, 8)
    assert InstructSettings.from_dict(defaults.to_dict()) == defaults
    for bad, message in [(dict(lr=0), "lr must be"), (dict(precision="fp8"), "precision must be"),
                         (dict(batch_size=0), "batch_size must be"), (dict(lora_rank=0), "lora_rank must be"),
                         (dict(lora_alpha=16), "lora_alpha needs lora_rank"),
                         (dict(max_length=0), "max_length must be")]:
        with pytest.raises(ValueError, match=message):
            InstructSettings(**bad)
    with pytest.raises(ValueError, match="unknown instruction fine-tuning settings: colour"):
        InstructSettings.from_dict({"colour": 1})


@pytest.fixture
def one_thread():
    """A tiny model's steps run fastest on one thread (and far faster than on two busy ones)."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def small_model(vocab_size: int, context_length: int = 96, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=context_length, emb_dim=64, n_heads=4,
                         n_layers=2, name="instruct-test", **overrides))


def test_bad_runs_are_refused_before_anything_is_written(tmp_path, data):
    gpt2 = get_tokenizer("gpt2")
    quiet = InstructSettings(progress=False, device="cpu", max_steps=1)
    splits = (data[:8], data[8:9], data[9:10])
    model = small_model(50257, context_length=256)
    cases = [
        (dict(tokenizer=CharTokenizer("abc")), "has no end-of-text token"),
        (dict(model=small_model(1000)), "not made for this model"),
        (dict(settings=quiet.replace(max_length=257)), "exceeds the model's context length of 256"),
        (dict(settings=quiet.replace(batch_size=9)), "8 training examples make no full batch of 9"),
        (dict(settings=quiet.replace(mask_prompt=True, max_length=20)),
         r"train example 1 \('Evaluate the .*'\): its prompt alone is 54 tokens"),
        (dict(splits=([], data[:1], data[:1])), "no training examples"),
        (dict(splits=(data[:8], [{"instruction": "x"}], [])), "val example 1: missing 'output'"),
        (dict(settings=quiet.replace(precision="fp16")), "fp16 training needs a CUDA GPU"),
    ]
    for change, message in cases:
        arguments = dict(model=model, tokenizer=gpt2, splits=splits, settings=quiet) | change
        out = tmp_path / "never"
        with pytest.raises(ValueError, match=message):
            finetune_instruct(arguments["model"], arguments["tokenizer"], arguments["splits"], out,
                              arguments["settings"])
        assert not out.exists()


def test_one_bf16_step_on_the_tutorials_data_with_gpt2s_tokenizer_counts_truncations(data, one_thread):
    gpt2, template = get_tokenizer("gpt2"), InstructionTemplate()
    splits = split_instructions(data[:40])
    settings = InstructSettings(max_steps=1, batch_size=4, max_length=64, precision="bf16", device="cpu",
                                threads=one_thread, max_new_tokens=3, test_responses=2, progress=False)
    results = finetune_instruct(small_model(50257, context_length=128), gpt2, splits, None, settings)
    def length(e: dict) -> int:
        prompt = template.format_prompt(e["instruction"], e["input"])
        return len(gpt2.encode(prompt)) + len(gpt2.encode(e["output"]))

    lengths = {name: [length(e) for e in part] for name, part in splits._asdict().items()}
    assert results["truncated"] == {name: sum(n > 64 for n in ns) for name, ns in lengths.items()}
    assert results["truncated"]["train"] > 0
    assert results["tokens"] == {name: sum(min(n, 64) for n in ns) for name, ns in lengths.items()}
    assert results["examples"] == {"train": 34, "val": 2, "test": 4} and results["test_responses"] == 2
    assert results["steps"] == 1 and results["precision"] == "bf16"
    assert all(math.isfinite(results[f"{name}_loss"]) for name in ("train", "val", "test"))


# ---------------------------------------------------------------- the mechanism, end to end


def test_a_small_model_learns_to_answer_its_training_instructions_exactly(tmp_path, data, one_thread):
    """The issue's test: after fine-tuning, a training instruction gets exactly its response.

    A 2-block, 64-wide model over a 400-token byte-level BPE (with GPT-2's end-of-text token) learned
    from the examples, so that a step costs milliseconds on a CPU.
    """
    template = InstructionTemplate()
    train = [e for e in data if len(e["output"]) < 60][:6]
    assert sum(1 for e in train if e["input"]) >= 2
    tokenizer = BPETokenizer().train("".join(template.format_example(e) for e in train), 400)
    model = small_model(tokenizer.vocab_size)
    settings = InstructSettings(lr=3e-3, max_steps=60, batch_size=6, weight_decay=0.0, eval_every=20,
                                eval_batches=1, max_new_tokens=40, device="cpu", threads=one_thread,
                                progress=False, mask_prompt=True)
    out = tmp_path / "run"
    results = finetune_instruct(model, tokenizer, (train, train[:2], train), out, settings)

    for example in train:
        assert respond(model, tokenizer, template, example["instruction"], example["input"],
                       max_new_tokens=40) == example["output"]
    rows = [json.loads(line) for line in (out / "test_responses.jsonl").read_text().splitlines()]
    assert rows == [{"instruction": e["instruction"], "input": e["input"], "expected": e["output"],
                     "generated": e["output"]} for e in train]

    saved = json.loads((out / "results.json").read_text())
    assert saved["examples"] == {"train": 6, "val": 2, "test": 6} and saved["steps"] == 60
    assert saved["test_responses"] == 6 and saved["truncated"] == {"train": 0, "val": 0, "test": 0}
    assert saved["train_loss"] == pytest.approx(results["train_loss"]) and saved["train_loss"] < 0.1
    assert saved["test_loss"] == pytest.approx(saved["train_loss"])  # the same examples
    # The reported loss is the mean over every response token and end of text, computed here independently.
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in train:
            prompt = tokenizer.encode(template.format_prompt(e["instruction"], e["input"]))
            ids = prompt + tokenizer.encode(e["output"]) + [tokenizer.eos_id]
            log_probs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
            for position in range(len(prompt) - 1, len(ids) - 1):
                total -= log_probs[position, ids[position + 1]].item()
                count += 1
    assert saved["train_loss"] == pytest.approx(total / count, rel=1e-4)
    prompts = [template.format_prompt(e["instruction"], e["input"]) for e in train]
    assert saved["tokens"]["train"] == sum(len(tokenizer.encode(prompt)) + len(tokenizer.encode(e["output"]))
                                           for prompt, e in zip(prompts, train, strict=True))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 61))
    assert [r["step"] for r in records if r["event"] == "eval"] == [20, 40, 60]
    assert records[0]["train_loss"] > 3 * records[-1]["train_loss"]
    assert (out / "loss.png").stat().st_size > 10_000

    # The checkpoint reloads with its tokenizer and template, and answers the same.
    loaded, loaded_tokenizer = load_model(out)
    assert load_template(out) == template
    assert json.loads((out / "glassgpt.json").read_text())["finetune"]["task"] == "instruct"
    answers = respond_many(loaded, loaded_tokenizer, load_template(out), train, max_new_tokens=40,
                           batch_size=4)
    assert answers == [e["output"] for e in train]

    # A second run into the same directory is refused, and the good model stays as it was.
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a model"):
        finetune_instruct(loaded, loaded_tokenizer, (train, [], []), out, settings)
    assert (out / "model.safetensors").read_bytes() == weights


# ---------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapters_and_saves_an_ordinary_model(tmp_path, data, one_thread, monkeypatch):
    import copy

    import glassgpt.finetune_common as finetune_common
    from glassgpt.lora import LoRALinear, load_adapters

    captured, merge = {}, finetune_common.merge_adapters

    def capture(model, directory, save_adapters):  # the model as it is just before its adapters merge
        captured["model"] = copy.deepcopy(model).eval()
        merge(model, directory, save_adapters)

    monkeypatch.setattr(finetune_common, "merge_adapters", capture)
    template = InstructionTemplate()
    train = [e for e in data if len(e["output"]) < 60][:6]
    tokenizer = BPETokenizer().train("".join(template.format_example(e) for e in train), 300)
    model = small_model(tokenizer.vocab_size)  # tied head: it and the embedding stay frozen
    base = copy.deepcopy(model)
    settings = InstructSettings(lr=3e-3, max_steps=6, batch_size=3, eval_every=3, eval_batches=1,
                                max_new_tokens=4, test_responses=1, device="cpu", threads=one_thread,
                                progress=False, lora_rank=2, lora_alpha=4)
    out = tmp_path / "run"
    results = finetune_instruct(model, tokenizer, (train, train[:2], train[:2]), out, settings)

    # rank x (in + out) per wrapped matrix (qkv d->3d, out_proj d->d, expand d->4d, contract 4d->d) in each
    # of the 2 blocks, nothing else; d = 64.
    d, rank = 64, 2
    expected = 2 * rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert expected == 4096
    assert results["trainable_parameters"] == expected
    assert json.loads((out / "results.json").read_text())["trainable_parameters"] == expected
    assert not (out / "adapters.safetensors").exists()  # not asked for

    unmerged = captured["model"]
    adapters = [m for m in unmerged.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 8 and all(m.B.abs().sum() > 0 for m in adapters)
    assert torch.equal(unmerged.tok_emb.weight, base.tok_emb.weight)  # frozen
    saved, _ = load_model(out)
    assert not any(isinstance(m, LoRALinear) for m in saved.modules())
    assert set(saved.state_dict()) == set(base.state_dict())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged in place too
    ids = torch.tensor([tokenizer.encode(template.format_example(e))[:40] for e in train[:3]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids), unmerged(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.eval()(ids), unmerged(ids), atol=1e-5, rtol=1e-5)

    # Asked for, the adapters are written too: loaded onto the base model they give the unmerged model.
    finetune_instruct(copy.deepcopy(base), tokenizer, (train, [], []), tmp_path / "with",
                      settings.replace(save_adapters=True))
    again = captured["model"]
    rebuilt = load_adapters(copy.deepcopy(base), tmp_path / "with" / "adapters.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids), again(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "with")[0](ids), again(ids), atol=1e-5, rtol=1e-5)


def test_a_lora_rank_the_model_cannot_take_is_refused_before_anything_is_written(tmp_path, data):
    model = small_model(50257, context_length=256)  # 64 wide: no matrix has a rank above 64
    quiet = InstructSettings(progress=False, device="cpu", max_steps=1, lora_rank=65)
    with pytest.raises(ValueError, match="LoRA rank 65 is larger than the layer"):
        finetune_instruct(model, get_tokenizer("gpt2"), (data[:8], [], []), tmp_path / "never", quiet)
    assert not (tmp_path / "never").exists()
    assert all(p.requires_grad for p in model.parameters())  # the model is as it was
    for bad, message in [(dict(lora_rank=0), "lora_rank must be"), (dict(save_adapters=True),
                                                                      "save_adapters needs lora_rank")]:
        with pytest.raises(ValueError, match=message):
            InstructSettings(**bad)
