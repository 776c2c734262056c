"""`glassgpt finetune`: the tutorial's fine-tuning runs as named recipes, and, for each task, the
steps from a --model spec and a data file to a finished run.

    settings, model, data = finetune_recipe("spam")         # ClassifySettings, "gpt2", bundled data
    run_finetune_classify(model, data, "runs/spam", settings)
    run_finetune_instruct("gpt2-medium", "bundled:instruction-data.json", "runs/instruct")

The tasks themselves live in `glassgpt.classify` (a classification head, chapter 6) and
`glassgpt.instruct` (instruction following, chapter 7); this module only names the runs and puts
the pieces together in the order that refuses bad input cheaply: the model spec and the data file
are checked before any weights are read.
"""

from __future__ import annotations

from pathlib import Path

TASKS = ("classify", "instruct")

# Each recipe: its task, the model and data it starts from, and its settings (the task's settings
# class fills in the rest with its defaults). Any --flag overrides any of them.
FINETUNE_RECIPES: dict[str, dict] = {
    # Chapter 6: GPT-2 small learns to tell spam from ham on the SMS Spam Collection, undersampled to
    # 747 + 747 messages, split 70/10/20, training the last block, the final norm and a 2-class head
    # with AdamW (lr 5e-5, weight decay 0.1) for 5 epochs of batches of 8.
    "spam": dict(task="classify", model="gpt2", data="bundled:sms-spam-collection.tsv",
                 settings=dict(balance=True, split="70/10/20", train_layers="last", lr=5e-5,
                               weight_decay=0.1, epochs=5, batch_size=8)),
    # Chapter 7: GPT-2 medium (355M) learns to follow the 1,100 Alpaca-style instructions (split
    # 85/5/10) with AdamW (lr 5e-5, weight decay 0.1) for 2 epochs of batches of 8.
    "instruct": dict(task="instruct", model="gpt2-medium", data="bundled:instruction-data.json",
                     settings=dict(lr=5e-5, weight_decay=0.1, epochs=2, batch_size=8)),
}


def settings_class(task: str) -> type:
    """The settings dataclass of a task: ClassifySettings or InstructSettings."""
    if task == "classify":
        from glassgpt.classify import ClassifySettings

        return ClassifySettings
    if task == "instruct":
        from glassgpt.instruct import InstructSettings

        return InstructSettings
    raise ValueError(f"unknown fine-tuning task {task!r}; choose one of: {', '.join(TASKS)}")


def recipes_for(task: str) -> list[str]:
    return [name for name, entry in FINETUNE_RECIPES.items() if entry["task"] == task]


def finetune_recipe(name: str, task: str | None = None, model: str | None = None, data: str | None = None,
                    **overrides):
    """(settings, model spec, data path) of the recipe `name`, with any of them replaced.

    `task`, when given, must be the recipe's (`glassgpt finetune classify --recipe instruct` is
    refused). `overrides` replace the recipe's settings, field by field.
    """
    if name not in FINETUNE_RECIPES:
        raise ValueError(f"unknown fine-tuning recipe {name!r}; choose one of: {', '.join(FINETUNE_RECIPES)}")
    entry = FINETUNE_RECIPES[name]
    if task is not None and task != entry["task"]:
        raise ValueError(f"recipe {name} is a `glassgpt finetune {entry['task']}` run, not {task}; "
                         f"{task} recipes: {', '.join(recipes_for(task)) or 'none'}")
    settings = settings_class(entry["task"])(**{**entry["settings"], **overrides})
    return settings, model or entry["model"], data or entry["data"]


def run_finetune_instruct(model_spec: str, data_path: str | Path, out_dir: str | Path | None,
                          settings=None, template=None) -> dict:
    """`glassgpt finetune instruct`: read and check the examples, split them 85/5/10 (shuffled with
    the settings' seed), load the model (any --model spec), and fine-tune it
    (`instruct.finetune_instruct`, which checks everything else before the first step and writes
    `out_dir`)."""
    from glassgpt.hub import check_model_spec, resolve_model
    from glassgpt.instruct import InstructSettings, finetune_instruct, load_instructions, split_instructions

    settings = settings or InstructSettings()
    check_model_spec(model_spec)
    examples = load_instructions(data_path)
    splits = split_instructions(examples, seed=settings.seed)
    model, tokenizer, _ = resolve_model(model_spec)
    if model.config.n_classes:
        raise ValueError(f"{model_spec} is a classifier; instruction fine-tuning starts from a language "
                         "model")
    return finetune_instruct(model, tokenizer, splits, out_dir, settings, template)


def run_finetune(task: str, model_spec: str, data_path: str | Path, out_dir: str | Path | None,
                 settings) -> dict:
    """Run a fine-tuning `task` ("classify" or "instruct"); returns its results (also in
    `out_dir/results.json`)."""
    if task == "classify":
        from glassgpt.classify import run_finetune_classify
        from glassgpt.classify_data import load_labelled
        from glassgpt.hub import check_model_spec

        check_model_spec(model_spec)  # cheap checks first: a typo costs no loading of weights
        load_labelled(data_path, settings.labels)
        return run_finetune_classify(model_spec, str(data_path), out_dir, settings)
    if task == "instruct":
        return run_finetune_instruct(model_spec, data_path, out_dir, settings)
    raise ValueError(f"unknown fine-tuning task {task!r}; choose one of: {', '.join(TASKS)}")
