"""The `glassgpt` command (also `python -m glassgpt`): thin verbs that parse, call the library, and print.

Each verb imports what it needs inside its function, so a verb never pays for another's imports
(the server's FastAPI, the walk-through's rich, matplotlib...) and the command starts fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glassgpt.train import TrainConfig

# Where `make demo` (`glassgpt demo`) puts its model, and so the model the verbs use by default: a
# newcomer's first `glassgpt generate "hi"` after `make demo` runs the model it just trained.
DEMO_MODEL = "runs/demo"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from glassgpt.config import get_preset
    from glassgpt.model import GPT

    config = get_preset(args.preset)
    with torch.device("meta"):  # count without allocating (gpt2-xl is 6 GB in fp32)
        model = GPT(config)
    rows = model.parameter_breakdown()
    if not args.per_block:  # fold the identical blocks into one "each" row per component
        blocks = [r for r in rows if r[0].startswith("block ")]
        others = [r for r in rows if not r[0].startswith("block ")]
        folded = []
        for part in ("attention", "feed-forward", "norms"):
            counts = [n for name, n in blocks if name.endswith(part)]
            folded.append((f"per block: {part} (x{len(counts)})", counts[0]))
            folded.append((f"all blocks: {part}", sum(counts)))
        rows = others[:2] + folded + others[2:]
    total = model.num_parameters()
    print(f"{config.name}: {config.n_layers} blocks, {config.n_heads} heads, emb {config.emb_dim}, "
          f"ff {config.hidden_dim}, context {config.context_length}, vocab {config.vocab_size:,}")
    width = max(len(name) for name, _ in rows)
    for name, count in rows:
        print(f"  {name:<{width}}  {count:>15,}")
    for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
        size = total * nbytes
        shown = f"{size / 2**20:>11,.1f} MiB" if size >= 2**20 else f"{size / 2**10:>11,.1f} KiB"
        print(f"  {'size ' + dtype:<{width}}  {shown}")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from glassgpt.tokenizer import get_tokenizer

    if args.tokenizer == "bpe":  # the from-scratch BPE over GPT-2's table: same ids, pure Python
        from glassgpt.bpe import BPETokenizer

        tokenizer = BPETokenizer.from_tiktoken_ranks()
    else:
        tokenizer = get_tokenizer(args.tokenizer, text=args.text if args.tokenizer == "char" else None)
    ids = tokenizer.encode(args.text)
    for token_id, piece in zip(ids, tokenizer.token_strings(ids), strict=True):
        print(f"{token_id:>7}  {piece!r}")
    print(f"{len(ids)} tokens")
    return 0


# ---------------------------------------------------------------- train and demo


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One `--flag` per field of a settings dataclass (TrainConfig, ClassifySettings, InstructSettings),
    its help from the field's metadata; a flag not given is absent from the parsed arguments, so a
    recipe's value (or the field's default) stands. Booleans get --flag/--no-flag, `list[str]` fields
    several values, an optional list or a tuple one text the settings class parses ("ham,spam",
    "70/10/20"), everything else one value of the field's type ("none" for None)."""
    hints = typing.get_type_hints(settings_class)
    for setting in dataclasses.fields(settings_class):
        flag = "--" + setting.name.replace("_", "-")
        kind = hints[setting.name]
        help_text = setting.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif kind == list[str]:
            parser.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
            base = next(t for t in typing.get_args(kind) if t is not type(None)) if optional else kind
            if typing.get_origin(base) in (list, tuple):  # one text; the dataclass splits it
                metavar = "A,B,..." if typing.get_origin(base) is list else "/".join("N" * len(
                    typing.get_args(base)))
                parser.add_argument(flag, type=_optional(str), default=argparse.SUPPRESS, metavar=metavar,
                                    help=help_text)
            else:
                parser.add_argument(flag, type=_optional(base), default=argparse.SUPPRESS,
                                    metavar=base.__name__.upper(), help=help_text)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`--recipe`, `--resume`, and one `--flag` per TrainConfig setting (given flags override the recipe)."""
    from glassgpt.train import RECIPES, TrainConfig

    parser.add_argument("--recipe", choices=list(RECIPES), help="named settings to start from")
    parser.add_argument("--resume", metavar="DIR", help="continue the run checkpointed in DIR (its settings, "
                        "unless overridden)")
    add_settings_arguments(parser, TrainConfig)


def _optional(base: type):
    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__
    return parse


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """(settings, resume?) from parsed arguments: recipe or saved run, then the flags given."""
    from glassgpt.train import RECIPES, TrainConfig, saved_config

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in names}
    if args.resume:
        base = saved_config(args.resume).to_dict()
        given["out"] = args.resume
    elif args.recipe:
        base = RECIPES[args.recipe]
    else:
        base = {}
    if not args.resume and not given.get("out"):
        raise ValueError("say where the run goes: --out DIR")
    return TrainConfig(**{**base, **given}), bool(args.resume)


def cmd_train(args: argparse.Namespace) -> int:
    """Train as the arguments say (alone, or as one process of torchrun); print where the result is."""
    import torch

    from glassgpt.checkpoint import NoSpaceLeft
    from glassgpt.distributed import PeerLost
    from glassgpt.train import TrainingDiverged, train

    config, resume = config_from_args(args)
    try:
        trainer = train(config, resume=resume)
        if torch.distributed.is_initialized():
            # Every rank finishes its last collective and rank 0 its last write before any rank tears
            # the group down; tearing down early aborts the other rank's gloo threads (SIGABRT).
            torch.distributed.barrier()
    except (TrainingDiverged, PeerLost):  # the trainer said what happened and what was kept
        return 1
    except NoSpaceLeft as error:  # its message says which checkpoint is intact and how to go on
        print(f"glassgpt: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.dist.is_main and trainer.out:
        print(f"done: {trainer.step} steps; model in {trainer.out} "
              f"(glassgpt generate --model {trainer.out}), metrics in {trainer.out / 'metrics.jsonl'}")
    return 0


# ---------------------------------------------------------------- fine-tuning and classifiers


def finetune_from_args(task: str, args: argparse.Namespace):
    """(settings, model spec, data path, out) of `glassgpt finetune TASK`: the recipe's (if any),
    then the flags given."""
    from glassgpt.finetune import finetune_recipe, settings_class

    names = {f.name for f in dataclasses.fields(settings_class(task))}
    given = {name: value for name, value in vars(args).items() if name in names}
    if args.recipe:
        settings, model, data = finetune_recipe(args.recipe, task, args.model, args.data, **given)
    else:
        settings, model, data = settings_class(task)(**given), args.model, args.data
        if not model:
            raise ValueError("say which model to start from: --model MODEL (a GPT-2 name, a checkpoint "
                             "directory), or a --recipe")
        if not data:
            raise ValueError("say what to train on: --data FILE, or a --recipe")
    if not args.out:
        raise ValueError("say where the run goes: --out DIR")
    return settings, model, data, args.out


def cmd_finetune(args: argparse.Namespace) -> int:
    from glassgpt.finetune import run_finetune

    settings, model, data, out = finetune_from_args(args.task, args)
    print(f"fine-tuning {model} to {'classify' if args.task == 'classify' else 'follow instructions'} "
          f"on {data} into {out}")
    try:
        results = run_finetune(args.task, model, data, out, settings)
    except KeyboardInterrupt:
        return 130
    if args.task == "classify":
        accuracy = results["test_accuracy"]
        shown = "-" if accuracy is None else f"{accuracy:.2%}"
        print(f"done: {results['steps']} steps, test accuracy {shown}; classifier in {out} "
              f"(glassgpt classify --model {out} \"some text\"), results in {Path(out) / 'results.json'}")
    else:
        print(f"done: {results['steps']} steps, test loss {results['test_loss']}; model in {out} "
              f"(glassgpt generate --model {out} --instruction \"...\"), results in "
              f"{Path(out) / 'results.json'}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    import json

    from glassgpt.classify import load_classifier, predict
    from glassgpt.hub import check_model_spec

    check_model_spec(args.model)
    if not Path(args.model).is_dir():  # a GPT-2 name or a preset: a language model
        raise ValueError(f"{args.model} is a language model, not a classifier (train one with "
                         "glassgpt finetune classify)")
    if args.batch_size < 1:
        raise ValueError(f"batch size must be positive, got {args.batch_size}")
    model, tokenizer, info = load_classifier(args.model, args.device)
    results = predict(model, tokenizer, args.texts, args.batch_size, info.get("max_length"))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for result in results:
        probabilities = ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items())
        print(f"{result['label']}\t({probabilities})\t{result['text']}")
    return 0


def about(seconds: float) -> str:
    """A duration as a person reads an estimate: "40 seconds", "3 minutes", "1 h 25 min"."""
    if seconds < 90:
        return f"{max(1, round(seconds / 10) * 10 if seconds >= 20 else round(seconds))} seconds"
    minutes = round(seconds / 60)
    return f"{minutes} minutes" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


class StepTimer:
    """A `Trainer.step_hooks` entry that times a run's first steps and says how long the rest will
    take on this machine: the first step after a (re)start is left out (allocation, first-touch
    warm-up), the next `steps` are timed, and the estimate covers the steps left, with evaluations
    counted as their forward passes (each batch's forward is about a third of a training step)."""

    def __init__(self, steps: int = 3, clock=time.perf_counter):
        self.steps, self.clock = steps, clock
        self.first: int | None = None
        self.start = 0.0

    def __call__(self, trainer) -> None:
        import torch

        if self.first is None:
            self.first, self.start = trainer.step, self.clock()
            return
        if trainer.step != self.first + self.steps:
            return
        per_step = (self.clock() - self.start) / self.steps
        left = trainer.total_steps - trainer.step
        evaluations = sum(1 for s in range(trainer.step + 1, trainer.total_steps + 1)
                          if s % trainer.eval_every == 0 or s == trainer.total_steps)
        # Each evaluation: eval_batches forward passes on the training and on the validation set.
        equivalent = left + evaluations * 2 * trainer.config.eval_batches / 3
        threads = torch.get_num_threads()
        trainer.say(f"this machine: {per_step:.2f} s per step (steps {self.first + 1}-{trainer.step}, "
                    f"{threads} CPU thread{'s' * (threads != 1)}): the {left} steps left and {evaluations} "
                    f"evaluations take about {about(per_step * equivalent)}")


def demo(out: str | Path = DEMO_MODEL, recipe_name: str = "demo", serve: bool = True,
         host: str = "127.0.0.1", port: int = 8000) -> int:
    """The README's main job: train `recipe_name` into `out` unless a model is there, print samples,
    then serve the model in the browser (when `glassgpt.serve` is available). Returns an exit status."""
    import importlib

    import torch

    from glassgpt.checkpoint import has_checkpoint
    from glassgpt.train import Trainer, recipe, saved_config
    from glassgpt.weights import GLASSGPT_META, load_model

    out = Path(out)
    settings = recipe(recipe_name, out=str(out))
    if (out / GLASSGPT_META).exists() and not (out / ".demo-training").exists():
        print(f"using the model already trained in {out} (delete the directory to train it again)")
    else:
        resume = has_checkpoint(out)  # an earlier demo was interrupted: continue it
        print(f"{'resuming' if resume else 'training'} the '{recipe_name}' recipe into {out} "
              "(Ctrl-C stops, running again resumes; how long it takes here follows from its first steps)")
        out.mkdir(parents=True, exist_ok=True)
        (out / ".demo-training").touch()  # marks a model file written by an unfinished run
        trainer = Trainer(saved_config(out) if resume else settings, resume=resume)
        trainer.step_hooks.append(StepTimer())
        trainer.fit()
        (out / ".demo-training").unlink()
    model, tokenizer = load_model(out)
    prompt = torch.tensor([tokenizer.encode(settings.sample_prompt)])
    for label, sampling in (("greedy", {}), ("sampled, temperature 0.7, top-k 50",
                                             {"temperature": 0.7, "top_k": 50, "seed": settings.seed})):
        text = tokenizer.decode(model.generate(prompt, 40, **sampling)[0].tolist())
        print(f"\n[{label}]\n{text}")
    if not serve:
        return 0
    try:
        server = importlib.import_module("glassgpt.serve")
    except ImportError as error:
        print(f"\n(the web server is not available: {error}); "
              f"try: glassgpt generate --model {out} \"Every effort\"")
        return 0
    print(f"\nstarting the web server: open http://{host}:{port}/ in a browser (Ctrl-C stops)")
    server.serve(str(out), host=host, port=port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return demo(args.out, recipe_name=args.recipe, serve=args.serve, host=args.host, port=args.port)


def cmd_prepare(args: argparse.Namespace) -> int:
    from glassgpt.data import prepare

    meta = prepare(args.corpus, args.out, tokenizer_name=args.tokenizer)
    print(f"{meta['n_tokens']:,} tokens ({meta['dtype']}, vocabulary {meta['vocab_size']:,}) in {args.out}; "
          f"train on it with: glassgpt train --corpus {args.out} ...")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import json

    from glassgpt.explain import list_topics, print_topic, run_topic

    if args.list or args.topic is None:
        for name, title in list_topics():
            print(f"{name:<14}{title}")
        return 0
    model = tokenizer = None
    if args.model:
        from glassgpt.weights import load_model

        model, tokenizer = load_model(args.model)
    result = run_topic(args.topic, model, tokenizer)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_topic(result)
    return 0


def _instruction_prompt(args: argparse.Namespace) -> str | None:
    """The prompt `--instruction` (and `--input`) make with the model's saved template, else None.

    A model saved without a template (GPT-2, an exported model) gets the default Alpaca template,
    the tutorial's, with a warning: most instruction-tuned GPT-2s were trained on it.
    """
    from glassgpt.instruct import InstructionTemplate, load_template

    if args.instruction is None:
        if args.prompt is None:
            raise ValueError("give a prompt to continue, or --instruction TEXT for an instruction-tuned "
                             "model")
        if args.input is not None:
            raise ValueError("--input goes with --instruction")
        return None
    if args.prompt is not None:
        raise ValueError("give a prompt or --instruction, not both")
    if not args.instruction.strip():
        raise ValueError("the instruction is empty")
    template = load_template(args.model) if Path(args.model).is_dir() else None
    if template is None:
        template = InstructionTemplate()
        print(f"glassgpt: warning: {args.model} has no saved instruction template (it was not trained with "
              "glassgpt finetune instruct); using the default Alpaca template", file=sys.stderr)
    return template.format_prompt(args.instruction, args.input or "")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from glassgpt.device import configure_cpu_threads
    from glassgpt.generate import Sampling, Timing, stream_text
    from glassgpt.hub import check_model_spec, resolve_model

    # A Sampling checks its settings as it is made: here, before loading gigabytes of weights.
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        stop=args.stop or ())
    check_model_spec(args.model)
    instruction_prompt = _instruction_prompt(args)
    max_tokens = args.max_tokens or (256 if instruction_prompt is not None else 50)
    configure_cpu_threads(args.threads)  # --threads, else the cores other processes leave free now
    model, tokenizer, description = resolve_model(args.model, device=args.device, dtype=args.dtype)
    if model.config.n_classes:
        raise ValueError(f"{args.model} is a classifier: it scores classes, it does not generate text "
                         f"(try: glassgpt classify --model {args.model} \"some text\")")
    timing = Timing()
    prompt = args.prompt if instruction_prompt is None else instruction_prompt
    pieces = stream_text(model, tokenizer, prompt, max_tokens, sampling, timing=timing,
                         compile=args.compile)
    if instruction_prompt is not None:
        # Only the response, as instruct.respond gives it: generation ends at the end-of-text token,
        # and the whitespace around the response is not part of it.
        if args.stream:
            started = False
            for piece in pieces:
                piece = piece if started else piece.lstrip()
                started = started or bool(piece)
                print(piece, end="", flush=True)
            print()
        else:
            print("".join(pieces).strip())
    elif args.stream:
        print(args.prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
    else:
        print(args.prompt + "".join(pieces))
    if args.verbose:
        print(f"[{description}; {timing.prompt_tokens} prompt tokens, {timing.new_tokens} new; "
              f"prefill {timing.prefill_tokens_per_second:,.1f} tokens/s, "
              f"decode {timing.decode_tokens_per_second:,.1f} tokens/s; "
              f"{torch.get_num_threads()} threads]", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from glassgpt.evaluate import evaluate_model

    result = evaluate_model(args.model, args.data, device=args.device, dtype=args.dtype,
                            context_length=args.context_length, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if "confusion" in result:  # a classifier
        correct = sum(result["confusion"][i][i] for i in range(len(result["classes"])))
        print(f"{result['model']} on {result['data']}: {result['examples']:,} examples\n"
              f"accuracy  {result['accuracy']:.2%} ({correct:,} of {result['examples']:,})\n"
              "confusion (rows: true class, columns: predicted)")
        names = result["classes"]
        width = max(len(name) for name in names)
        cells = max(6, *(len(name) for name in names), len(f"{result['examples']:,}"))
        print(f"  {'':<{width}}  " + "  ".join(f"{name:>{cells}}" for name in names))
        for name, row in zip(names, result["confusion"], strict=True):
            print(f"  {name:<{width}}  " + "  ".join(f"{count:>{cells},}" for count in row))
        return 0
    print(f"{result['model']} on {result['data']}: {result['tokens']:,} tokens predicted in "
          f"{result['windows']:,} windows of up to {result['context_length']:,}")
    print(f"loss           {result['loss']:.4f} nats per token\n"
          f"perplexity     {result['perplexity']:,.3f}\n"
          f"bits per byte  {result['bits_per_byte']:.4f} ({result['bytes']:,} bytes)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from glassgpt.hub import download_gpt2

    try:
        path = download_gpt2(args.name, args.dir)
    except ConnectionError as error:
        print(f"glassgpt: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.name} is in {path}; use it with: glassgpt generate \"Hello\" --model "
          f"{path if args.dir else args.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from glassgpt.hub import resolve_model
    from glassgpt.weights import HF_TOKENIZER_FILE, export_hf

    model, tokenizer, _ = resolve_model(args.checkpoint, presets=False)
    if model.config.n_classes:  # a classifier: its head scores classes, Hugging Face's `score` layer
        from glassgpt.classify import export_hf_classifier

        directory = export_hf_classifier(model, args.to_hf)
        print(f"wrote {directory}/config.json and model.safetensors (load with "
              f"transformers.GPT2ForSequenceClassification.from_pretrained({str(directory)!r}))")
        return 0
    directory = export_hf(model, args.to_hf, tokenizer=tokenizer)
    print(f"wrote {directory}/config.json and model.safetensors "
          f"(load with transformers.GPT2LMHeadModel.from_pretrained({str(directory)!r}))")
    if (directory / HF_TOKENIZER_FILE).exists():
        print(f"its tokenizer is not GPT-2's: {HF_TOKENIZER_FILE} holds it (glassgpt reads it back; "
              "transformers' GPT2Tokenizer does not apply)")
    return 0


def watched_run(args: argparse.Namespace) -> str:
    """`serve --run DIR`: the runs directory the /runs page reads (DIR's parent), and the model: the
    run's own, loaded when first asked (it may still be training), unless --model names another."""
    if args.run_dir is None:
        args.model = args.model or "runs/demo"
        return args.runs
    run = Path(args.run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"--run {run}: no metrics.jsonl there, so not a training run "
                                "(glassgpt train --out DIR writes one as it trains)")
    if args.model is None:
        args.model, args.lazy = str(run), True
    print(f"the run: http://{args.host}:{args.port}/runs?run={run.resolve().name}", flush=True)
    return str(run.resolve().parent)


def cmd_serve(args: argparse.Namespace) -> int:
    from glassgpt.device import has_native_bf16, pick_device
    from glassgpt.serve import serve

    device = pick_device(args.device)
    # bf16 halves the bytes each decoded token reads, where the device computes it natively
    if args.dtype == "auto":
        args.dtype = "bfloat16" if has_native_bf16(device) else "float32"
    from glassgpt.device import configure_cpu_threads

    configure_cpu_threads(args.threads)  # --threads, else the cores other processes leave free now
    runs_dir = watched_run(args)
    # serve() takes the port, then loads the model, then starts: a busy port or a model that cannot
    # load is one `glassgpt: error:` line (main), before any wait.
    serve(args.model, host=args.host, port=args.port, lazy=args.lazy, max_tokens_cap=args.max_tokens_cap,
          max_running=args.max_running, max_waiting=args.max_waiting, cors_origins=args.cors_origin or (),
          dtype=args.dtype, compile=args.compile, device=str(device), runs_dir=runs_dir,
          read_timeout_s=args.read_timeout, max_connections=args.max_connections)
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from glassgpt.serve import write_site

    files = write_site(args.dir, args.api)
    api = urlsplit(args.api)
    print(f"wrote {len(files)} files to {args.dir}, calling the API at {args.api}\n"
          f"try it:  python -m http.server 8080 --bind 127.0.0.1 --directory {args.dir}\n"
          f"         glassgpt serve --host {api.hostname} --port {api.port or 80} --cors-origin http://127.0.0.1:8080")
    return 0


def add_finetune_verbs(verbs) -> None:
    """`glassgpt finetune classify|instruct`: --model, --data, --out, --recipe, then one flag per
    field of the task's settings (`add_settings_arguments`, as `glassgpt train`'s)."""
    from glassgpt.finetune import recipes_for, settings_class

    finetune = verbs.add_parser("finetune", help="fine-tune a model: classify texts or follow instructions",
                                description="Start from a trained model and teach it a task "
                                "(docs/TRAINING.md, 'Fine-tuning').")
    tasks = finetune.add_subparsers(dest="task", required=True, metavar="TASK")
    about = {
        "classify": ("a classification head on a language model, trained on labelled texts",
                     "labelled texts: TSV label<TAB>text, CSV with label,text columns, or JSONL "
                     '{"label", "text"} (bundled:sms-spam-collection.tsv)'),
        "instruct": ("teach a language model to answer instructions (Alpaca format)",
                     'Alpaca-style JSON list or JSONL of {"instruction", "input", "output"} '
                     "(bundled:instruction-data.json)"),
    }
    for task, (help_text, data_help) in about.items():
        names = recipes_for(task)
        sub = tasks.add_parser(task, help=help_text,
                               description=f"{help_text[0].upper()}{help_text[1:]}. Every flag below "
                               f"overrides the recipe's value; optimisation flags mean what they mean for "
                               f"`glassgpt train`. Recipes: {', '.join(names)}.")
        sub.add_argument("--recipe", choices=names, help="the tutorial's run (its model and data unless "
                         "--model/--data say otherwise)")
        sub.add_argument("--model", default=None, help="the model to start from: a GPT-2 name found locally, "
                         "a checkpoint directory (glassgpt, Hugging Face, OpenAI) or a preset")
        sub.add_argument("--data", default=None, help=data_help)
        sub.add_argument("--out", default=None, metavar="DIR", help="where the fine-tuned model and its "
                         "results go")
        add_settings_arguments(sub, settings_class(task))
        sub.set_defaults(run=cmd_finetune, task=task)


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from glassgpt.hub import check_model_spec, resolve_model
    from glassgpt.inspect_report import print_report, report

    if args.view == "patch" and args.corrupt is None:  # refused before the weights load
        raise ValueError("--view patch needs --corrupt TEXT: a text of as many tokens whose answer differs")
    check_model_spec(args.model)
    model, tokenizer, _ = resolve_model(args.model, device=args.device, dtype=args.dtype)
    result = report(model, tokenizer, args.text, args.view, corrupt=args.corrupt, target=args.target,
                    block=args.block, top=args.top, method=args.method)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from glassgpt.config import PRESETS
    from glassgpt.hub import DTYPES, GPT2_NAMES

    parser = argparse.ArgumentParser(prog="glassgpt", description="A GPT you can see through.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    info = verbs.add_parser("info", help="parameter breakdown and size of a preset")
    info.add_argument("preset", choices=list(PRESETS))
    info.add_argument("--per-block", action="store_true", help="one row per block instead of folded rows")
    info.set_defaults(run=cmd_info)

    tokenize = verbs.add_parser("tokenize", help="show the tokens of a text with their ids")
    tokenize.add_argument("text")
    tokenize.add_argument("--tokenizer", choices=["gpt2", "char", "bpe"], default="gpt2")
    tokenize.set_defaults(run=cmd_tokenize)

    demo_verb = verbs.add_parser("demo",
                                 help="the main job: train the demo model if needed, sample it, serve it")
    demo_verb.add_argument("--out", default=DEMO_MODEL,
                           help="where the demo model lives (trained there if missing)")
    demo_verb.add_argument("--recipe", default="demo", help="the recipe trained when no model is there")
    demo_verb.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                           help="start the web server afterwards (when glassgpt.serve is installed)")
    demo_verb.add_argument("--host", default="127.0.0.1")
    demo_verb.add_argument("--port", type=int, default=8000)
    demo_verb.set_defaults(run=cmd_demo)

    train = verbs.add_parser("train", help="train a model: --recipe NAME --out DIR, any setting overridable",
                             description="Train from a recipe (or from scratch settings), from random "
                             "weights (--model PRESET) or from a trained model (--init-from MODEL), all "
                             "weights or LoRA adapters (--lora-rank R); every setting below overrides the "
                             "recipe's. The result in --out loads with `glassgpt generate --model DIR`.")
    add_train_arguments(train)
    train.set_defaults(run=cmd_train)

    prepare = verbs.add_parser("prepare", help="tokenise text files once into a memory-mapped token file")
    prepare.add_argument("corpus", nargs="+", help="text files")
    prepare.add_argument("--tokenizer", choices=["gpt2", "char"], default="gpt2")
    prepare.add_argument("--out", required=True, help="directory for tokens.bin and meta.json")
    prepare.set_defaults(run=cmd_prepare)

    explain = verbs.add_parser("explain",
                               help="the walk-through: one concept, step by step, with real numbers")
    explain.add_argument("topic", nargs="?", help="a topic from --list (no topic: list them)")
    explain.add_argument("--list", action="store_true", help="list the topics")
    explain.add_argument("--json", action="store_true", help="print the steps as JSON")
    explain.add_argument("--model", metavar="DIR",
                         help="a saved model for the block, gpt and sampling topics")
    explain.set_defaults(run=cmd_explain)

    generate = verbs.add_parser("generate", help="continue a prompt with a model, or answer an instruction",
                                description="Continue PROMPT; or, with --instruction, format it (and "
                                "--input) with the template saved by `glassgpt finetune instruct` and "
                                "print only the response, which ends at the end-of-text token. A model "
                                "saved without a template gets the default Alpaca template, with a warning.")
    generate.add_argument("prompt", nargs="?", help="the text to continue (not with --instruction)")
    generate.add_argument("--instruction", default=None,
                          help="an instruction for an instruction-tuned model: prints only its response")
    generate.add_argument("--input", default=None, help="the instruction's input, if it has one")
    generate.add_argument("--model", default=DEMO_MODEL,
                          help=f"checkpoint directory (default {DEMO_MODEL}, written by `make demo`, as for "
                               f"serve), GPT-2 name ({', '.join(GPT2_NAMES)}; found locally, never "
                               "downloaded) or preset (random weights)")
    generate.add_argument("--max-tokens", type=int, default=None,
                          help="new tokens at most (default 50; 256 for an --instruction's response)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None, help="same seed, same text")
    generate.add_argument("--stop", action="append", default=None, help="stop before this text (repeatable)")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--verbose", action="store_true", help="print prefill and decode speed")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--dtype", choices=list(DTYPES), default="float32",
                          help="int8: weight-only int8 (a scale per row), faster decoding on CPU")
    generate.add_argument("--threads", type=int, default=None, help="CPU threads (default: the usable cores "
                          "less those other processes keep busy)")
    generate.add_argument("--compile", action="store_true",
                          help="CPU: batches decode through the whole step compiled once (torch 2.13+; a "
                               "first-use compile of tens of seconds; needs a C++ compiler); one sequence "
                               "keeps the faster one-call step (glassgpt.cpu_step)")
    generate.set_defaults(run=cmd_generate)

    evaluate = verbs.add_parser("eval", help="measure a model: loss, perplexity and bits per byte on a text; "
                                "a classifier's accuracy and confusion matrix on a labelled file",
                                description="Loss, perplexity and bits per byte of a language model over "
                                "non-overlapping windows of its context, as training evaluates; for a "
                                "classifier, its accuracy and confusion matrix on a labelled file "
                                "(docs/TRAINING.md, 'Evaluate a model').")
    evaluate.add_argument("--model", required=True,
                          help="checkpoint directory (any format), GPT-2 name found locally, or preset")
    evaluate.add_argument("--data", default=None,
                          help="a text file, bundled:NAME or a prepared directory (default "
                               "bundled:the-verdict.txt); for a classifier, a labelled TSV, CSV or JSONL "
                               "file (required)")
    evaluate.add_argument("--json", action="store_true", help="print the numbers as JSON")
    evaluate.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, ...")
    evaluate.add_argument("--dtype", choices=list(DTYPES), default=None,
                          help="weights in memory (default: as saved)")
    evaluate.add_argument("--batch-size", type=int, default=8,
                          help="windows (a classifier: texts) per forward pass (default 8)")
    evaluate.add_argument("--context-length", type=int, default=None, metavar="N",
                          help="tokens per window, at most the model's (default: the model's)")
    evaluate.set_defaults(run=cmd_eval)

    add_finetune_verbs(verbs)

    classify = verbs.add_parser("classify", help="label texts with a classifier (glassgpt finetune classify)")
    classify.add_argument("texts", nargs="+", metavar="TEXT", help="one or more texts to classify")
    classify.add_argument("--model", required=True, metavar="DIR", help="a classifier's directory")
    classify.add_argument("--json", action="store_true",
                          help='print a JSON list of {"text", "label", "probabilities": {class: p}}')
    classify.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    classify.add_argument("--device", default="cpu")
    classify.set_defaults(run=cmd_classify)

    download = verbs.add_parser("download", help="fetch OpenAI's GPT-2 weights from the Hugging Face Hub")
    download.add_argument("name", choices=GPT2_NAMES)
    download.add_argument("--dir", default=None,
                          help="a directory to put the files in (default: the HF cache)")
    download.set_defaults(run=cmd_download)

    export = verbs.add_parser("export", help="write a checkpoint in another format")
    export.add_argument("checkpoint", help="a model directory (glassgpt, Hugging Face or OpenAI format) "
                        "or a GPT-2 name found locally")
    export.add_argument("--to-hf", required=True, metavar="DIR",
                        help="write config.json + model.safetensors for transformers' GPT2LMHeadModel "
                             "(a classifier: GPT2ForSequenceClassification)")
    export.set_defaults(run=cmd_export)

    serve = verbs.add_parser("serve", help="the web pages and the HTTP API (POST /generate, ...)")
    serve.add_argument("--model", default=None,
                       help="checkpoint directory (default runs/demo, written by `make demo`), a GPT-2 name "
                            "found locally, or a preset with GPT-2's vocabulary (gpt2, ..., verdict-162m: "
                            "random weights; tinygpt and nano have vocabularies of their own: train them)")
    serve.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, ...")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; checked before "
                       "the model loads)")
    serve.add_argument("--lazy", action="store_true",
                       help="load the model on the first request, not at start-up")
    serve.add_argument("--max-tokens-cap", type=int, default=256,
                       help="the most tokens one request may ask for")
    serve.add_argument("--max-running", type=int, default=1, help="generations at once")
    serve.add_argument("--max-waiting", type=int, default=8, help="requests queued; beyond them: 503")
    serve.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="weights in memory; auto: bfloat16 on CPUs with native bf16 (AVX-512 BF16/AMX), "
                            "else float32; int8 (weight-only, a scale per row) decodes faster on CPU")
    serve.add_argument("--compile", action="store_true",
                       help="CPU: batches' decode step compiled once (torch 2.13+; one sequence keeps the "
                            "faster one-call step); CUDA: the graphed decode step compiled; on start-up or "
                            "first use (seconds to a minute; needs a C++ compiler)")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads (default: the usable cores "
                       "less those other processes keep busy)")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="a browser origin allowed to call the API, e.g. https://site.example "
                            "(repeatable)")
    serve.add_argument("--read-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a request's headers, and its body, must arrive within this (else 408; "
                            "default 10)")
    serve.add_argument("--max-connections", type=int, default=64,
                       help="connections and requests at once; beyond them: 503 (default 64)")
    serve.add_argument("--runs", default="runs", metavar="DIR",
                       help="the training runs the /runs page shows: those under DIR (default: runs)")
    serve.add_argument("--run", dest="run_dir", metavar="DIR", default=None,
                       help="show this training run's loss curves and probe snapshots at /runs, even while "
                            "it trains (the model: --model, else the run's own, loaded when first asked)")
    serve.set_defaults(run=cmd_serve)

    site = verbs.add_parser("site", help="write the web pages as a static site that calls a remote API")
    site.add_argument("dir", help="output directory")
    site.add_argument("--api", required=True, metavar="URL", help="the API's address, e.g. https://api.example")
    site.set_defaults(run=cmd_site)

    inspect = verbs.add_parser("inspect", help="look inside a model on a text: logit lens, patching, ...",
                               description="One view of the model's inside on TEXT (docs/INSIDE.md "
                               "explains each): tables in the terminal, or JSON with --json.")
    inspect.add_argument("text", help="the text to look at (for --view embeddings, \"\" shows the most "
                         "frequent tokens)")
    inspect.add_argument("--model", default="runs/demo",
                         help="checkpoint directory (default runs/demo), GPT-2 name found locally, or preset")
    inspect.add_argument("--view", default="logit-lens",
                         choices=["logit-lens", "patch", "heads", "embeddings", "neurons", "residual"],
                         help="logit-lens (default): the top next token after each block; patch: "
                              "activation patching of --corrupt into TEXT; heads: each head silenced; "
                              "embeddings: map and neighbours; neurons: the feed-forward units that fire "
                              "most; residual: what each layer writes")
    inspect.add_argument("--corrupt", metavar="TEXT",
                         help="patch: the corrupted text, as many tokens as TEXT")
    inspect.add_argument("--target", metavar="TOKEN",
                         help="patch, heads: the one token (a classifier: the label) whose logit is "
                              "followed; default: the model's top prediction for TEXT")
    inspect.add_argument("--method", choices=["exact", "attribution"], default="exact",
                         help="heads: silence each head and run the model (exact, default), or estimate "
                              "that from one backward pass (attribution: seconds on long texts)")
    inspect.add_argument("--block", type=int, default=None, help="neurons: which block (default: the last)")
    inspect.add_argument("--top", type=int, default=None, metavar="K",
                         help="top tokens (logit-lens, 5), units (neurons, 10) or neighbours (embeddings, 5)")
    inspect.add_argument("--json", action="store_true", help="print the view as JSON")
    inspect.add_argument("--device", default="cpu")
    inspect.add_argument("--dtype", choices=list(DTYPES), default="float32")
    inspect.set_defaults(run=cmd_inspect)

    return parser


def _reader_gone() -> int:
    """The exit of a verb whose reader closed the pipe (`glassgpt explain | head`): quiet, status 1
    (what Python's documentation advises and rich's Console does for the same case). Later writes,
    the interpreter's final flush included, go to /dev/null instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout that is no real file (a test's capture): nothing to redirect
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except BrokenPipeError:
        return _reader_gone()
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as error:
        print(f"glassgpt: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
