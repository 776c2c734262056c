"""Watching a model learn (glassgpt.watch): probe snapshots equal transformers' views of the same
weights, are written at step 0 and each evaluation, survive a resume without duplicates or loss;
--tensorboard's event files hold exactly metrics.jsonl's numbers, and the gradient norm and
update/weight ratios equal ones computed by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from glassgpt import watch
from glassgpt.train import TrainConfig, Trainer
from glassgpt.weights import load_model

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

IDS = [11, 42, 7, 99, 3, 64]
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 3


class NumberNames:
    """The little a snapshot asks of a tokenizer for given ids: each id's text."""

    def token_strings(self, ids):
        return [f"t{i}" for i in ids]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers') holding the same random weights."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=120, n_positions=32, n_embd=48, n_head=4, n_layer=3, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.mul_(4.0) if parameter.dim() > 1 else parameter.add_(0.05 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    ours, _ = load_model(directory)
    hf = GPT2LMHeadModel.from_pretrained(directory, attn_implementation="eager").eval()
    return ours, hf


def test_snapshot_equals_transformers_predictions_logit_lens_and_attention(pair):
    ours, hf = pair
    ours.train()  # a snapshot taken mid-training leaves the flags as they were
    snap = watch.snapshot(ours, NumberNames(), IDS)
    assert ours.training and all(m.training for m in ours.modules())
    with torch.no_grad():
        out = hf(torch.tensor([IDS]), output_hidden_states=True, output_attentions=True)
    probs = torch.softmax(out.logits[0, -1], dim=-1)
    top = probs.topk(watch.NEXT_TOP)
    assert [t["id"] for t in snap["next"]] == top.indices.tolist()
    assert [t["text"] for t in snap["next"]] == [f"t{i}" for i in top.indices.tolist()]
    assert [t["prob"] for t in snap["next"]] == pytest.approx(top.values.tolist(), abs=1e-4)

    # transformers' last hidden state has ln_f applied already; the others go through it here.
    rows = [hf.lm_head(hf.transformer.ln_f(h)) for h in out.hidden_states[:-1]] + [out.logits]
    for depth, logits in enumerate(rows):
        lens = torch.softmax(logits[0], dim=-1).topk(watch.LENS_TOP)
        assert snap["lens"]["text"][depth] == [[f"t{i}" for i in row] for row in lens.indices.tolist()]
        assert snap["lens"]["prob"][depth] == [pytest.approx(row, abs=1e-4) for row in lens.values.tolist()]
    assert len(snap["attention"]) == 3
    for layer, weights in enumerate(out.attentions):
        for head in range(4):
            assert snap["attention"][layer][head] == [pytest.approx(row, abs=1e-4)
                                                     for row in weights[0, head].tolist()]
    assert snap["tokens"] == [f"t{i}" for i in IDS]
    assert snap["residual"]["names"][0] == "embeddings" and len(snap["residual"]["norms"]) == 7


def test_the_probe_is_cut_to_its_last_tokens_to_bound_the_attention_kept(pair):
    ours, _ = pair
    assert watch.probe_length(ours) == watch.MAX_PROBE_TOKENS  # 12 heads: 16 x 16 x 12 fits the budget
    gpt2_small = ours.config.replace(n_layers=12, n_heads=12, emb_dim=48)
    from glassgpt import GPT

    assert watch.probe_length(GPT(gpt2_small)) == 11  # 144 heads x 11 x 11 <= 20,000 weights
    with pytest.raises(ValueError, match="no tokens"):
        watch.probe_ids(ours, type("Empty", (), {"encode": lambda self, text: []})(), "")


def tiny(**overrides) -> TrainConfig:
    """A 2-block character model on a few lines: a step takes milliseconds."""
    settings = dict(
        text=TEXT, tokenizer="char", model="nano", context_length=16, n_layers=2, n_heads=2, emb_dim=32,
        drop_rate=0.1, stride=8, val_fraction=0.2, batch_size=4, grad_accum=2, epochs=2, lr=3e-3,
        schedule="cosine", warmup_steps=2, grad_clip=1.0, eval_every=2, checkpoint_every=4, eval_batches=2,
        sample_prompt="All:", sample_tokens=4, progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def probes(directory) -> list[dict]:
    records = [json.loads(line) for line in (directory / watch.PROBES_FILE).read_text().splitlines()]
    for record in records:
        record.pop("seconds")  # the time each took: the only field that differs between runs
    return records


def test_probes_at_step_0_and_each_evaluation_survive_a_resume(tmp_path):
    config = tiny(out=str(tmp_path / "straight"))
    straight = Trainer(config)
    straight.fit()
    expected = probes(tmp_path / "straight")
    evals = [r["step"] for r in straight.records if r["event"] == "eval"]
    assert [r["step"] for r in expected] == [0, *evals] == [0, 2, 4, 6, 8, 10]
    assert expected[0]["tokens"] == ["A", "l", "l", ":"] and expected[0]["probe"] == "All:"
    assert expected[0]["next"] != expected[-1]["next"]  # it learned something

    cut = config.replace(out=str(tmp_path / "cut"))
    Trainer(cut).fit(until_step=7)  # evaluations at 2, 4, 6; the checkpoint at 4: step 6 is lost
    assert [r["step"] for r in probes(tmp_path / "cut")] == [0, 2, 4, 6]
    Trainer(cut, resume=True).fit()
    # Each step once, and what the uninterrupted run saw (resume is exact).
    assert probes(tmp_path / "cut") == expected


def test_no_probe_text_records_nothing(tmp_path):
    Trainer(tiny(out=str(tmp_path / "run"), probe_text="", max_steps=2)).fit()
    assert not (tmp_path / "run" / watch.PROBES_FILE).exists()


def test_tensorboard_missing_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(watch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install"):
        tiny(out=str(tmp_path / "run"), tensorboard=str(tmp_path / "tb"))
    assert not (tmp_path / "run").exists()


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_tensorboard_scalars_equal_metrics_and_hand_computed_gradient_figures_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    config = tiny(out=str(tmp_path / "run"), tensorboard=str(tmp_path / "tb"), drop_rate=0.0, log_every=1,
                  grad_clip=0.05)
    trainer = Trainer(config)

    # Step 1 by hand: the gradient (accumulated as the trainer does) and its norm before clipping.
    model = copy.deepcopy(trainer.model)
    micro_batches = next(trainer.batches(0))
    for inputs, targets in micro_batches:
        (model(inputs, targets=targets) / len(micro_batches)).backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    before = weights(trainer.model)
    trainer.fit(until_step=1)
    after = weights(trainer.model)
    ratios = {}
    for layer in {watch.layer_of(name) for name in before}:
        names = [name for name in before if watch.layer_of(name) == layer]
        change = sum(((after[n] - before[n]).double() ** 2).sum() for n in names).sqrt()
        ratios[layer] = (change / sum((before[n].double() ** 2).sum() for n in names).sqrt()).item()
    first = trainer.records[0]
    assert grad_norm > 0.05  # so clipping changed the gradient: the norm logged is the one before
    assert first["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert first["update_to_weight"] == pytest.approx(ratios, rel=1e-4)
    assert set(ratios) == {"tok_emb", "pos_emb", "blocks.0", "blocks.1", "final_norm"}  # nano: tied head

    trainer.fit(until_step=7)  # the checkpoint at step 4: steps 5-7 are logged twice, once lost
    Trainer(config, resume=True).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    board.Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, dict[int, float]] = {}
    for record in logged:
        for tag, value in watch.scalars(record).items():
            expected.setdefault(tag, {})[record["step"]] = value
    assert {"train/train_loss", "train/lr", "train/grad_norm", "update_to_weight/blocks.1",
            "eval/val_loss"} <= set(expected)
    assert set(board.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        events = {event.step: event.value for event in board.Scalars(tag)}
        assert len(events) == len(board.Scalars(tag)), tag  # the cut run's steps 5-7 were purged
        assert events == pytest.approx(values, rel=1e-6), tag  # float32 in the event file
    steps = [r for r in logged if r["event"] == "step"]
    assert len(steps) == 10 and all("grad_norm" in r and len(r["update_to_weight"]) == 5 for r in steps)
    assert expected["train/train_loss"][3] == steps[2]["train_loss"]


def test_fine_tuning_records_the_first_validation_example_at_step_0_and_each_evaluation(tmp_path):
    from glassgpt.bpe import BPETokenizer
    from glassgpt.classify import ClassifySettings, run_finetune_classify
    from glassgpt.config import GPTConfig
    from glassgpt.instruct import InstructionTemplate, InstructSettings, finetune_instruct
    from glassgpt.model import GPT
    from glassgpt.tokenizer import CharTokenizer
    from glassgpt.weights import save_model

    # A classifier: its "next tokens" and logit lens are over its classes.
    lines = [f"{'yes' if i % 2 else 'no'}\t{'abz' if i % 2 else 'abd'}{'abcd'[i % 4]}" for i in range(40)]
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=5, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_weights=False)
    save_model(GPT(config), tmp_path / "base", CharTokenizer("abcdz"))
    run_finetune_classify(str(tmp_path / "base"), str(tmp_path / "data.tsv"), tmp_path / "spam",
                          ClassifySettings(train_layers="all", epochs=2, batch_size=8, device="cpu",
                                           eval_batches=1), log=None)
    records = probes(tmp_path / "spam")
    logged = [json.loads(line) for line in (tmp_path / "spam" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0] + [r["step"] for r in logged if r["event"] == "eval"]
    assert {t["text"] for t in records[-1]["next"]} == {"no", "yes"}
    assert len(records[-1]["lens"]["text"]) == 2 and len(records[-1]["lens"]["text"][0][0]) == 2

    # An instruction-tuned model: the probe is the first validation example's prompt, cut to its end.
    template = InstructionTemplate()
    examples = [{"instruction": f"Repeat {word}", "input": "", "output": word} for word in ("hi", "yo", "ok")]
    tokenizer = BPETokenizer().train("".join(template.format_example(e) for e in examples), 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=16, n_heads=2,
                          n_layers=1))
    settings = InstructSettings(max_steps=4, batch_size=2, eval_every=2, eval_batches=1, max_new_tokens=2,
                                device="cpu", progress=False, test_responses=0)
    finetune_instruct(model, tokenizer, (examples, examples[1:2], []), tmp_path / "instruct", settings)
    records = probes(tmp_path / "instruct")
    assert [r["step"] for r in records] == [0, 2, 4]
    prompt = template.format_prompt("Repeat yo")
    assert records[0]["probe"] == prompt
    end = tokenizer.encode(prompt)[-watch.MAX_PROBE_TOKENS:]
    assert "".join(records[0]["tokens"]) == tokenizer.decode(end)
