"""The inside views (`glassgpt.inspect`) for a text: JSON-able reports, and rich tables for the terminal.

`report(model, tokenizer, text, view, ...)` turns a text into token ids, runs one view and returns
plain data with every id shown as its text; `print_report` draws that data as tables.
`glassgpt inspect` is these two functions; a server can send `report`'s result as it is.
"""

from __future__ import annotations

import math

from glassgpt import inspect as views
from glassgpt.model import GPT

VIEWS = ("logit-lens", "patch", "heads", "embeddings", "neurons", "residual")
DEFAULT_TOP = {"logit-lens": 5, "neurons": 10, "embeddings": 5}
# How the heads view silences each head: run the model with it zeroed (`ablate_heads`), or estimate
# that from one backward pass (`attribute_heads`: seconds where the exact view takes minutes).
HEADS_METHODS = ("exact", "attribution")


def output_names(model: GPT, tokenizer, ids: list[int]) -> list[str]:
    """What the head's outputs `ids` are called: tokens' texts, or a classifier's labels."""
    if model.config.n_classes:
        labels = model.config.labels or tuple(f"class {i}" for i in range(model.config.n_classes))
        return [labels[i] for i in ids]
    return tokenizer.token_strings(ids)


def pick_target(model: GPT, tokenizer, ids: list[int], target: str | None) -> int:
    """The head output a view follows: `target` (one token's text, or a classifier's label), or, when
    it is None, the model's own top choice at the last position."""
    if target is None:
        with views.looking(model):
            return int(model(views.as_ids(model, ids))[0, -1].argmax())
    if model.config.n_classes:
        names = output_names(model, tokenizer, list(range(model.config.n_classes)))
        if target not in names:
            raise ValueError(f"target {target!r} is not one of this classifier's labels: {', '.join(names)}")
        return names.index(target)
    target_ids = tokenizer.encode(target)
    if len(target_ids) != 1:
        raise ValueError(f"the target must be one token; {target!r} is {len(target_ids)} tokens "
                         f"({', '.join(map(repr, tokenizer.token_strings(target_ids)))})")
    return target_ids[0]


def _tokens(tokenizer, ids: list[int]) -> list[dict]:
    return [{"id": i, "text": s} for i, s in zip(ids, tokenizer.token_strings(ids), strict=True)]


def report(model: GPT, tokenizer, text: str, view: str, corrupt: str | None = None, target: str | None = None,
           block: int | None = None, top: int | None = None, method: str = "exact") -> dict:
    """One view of `text` as JSON-able data (see docs/INSIDE.md for each view's fields).

    `corrupt`: the patching view's second text (as many tokens as `text`); `target`: the token (or
    label) the patching and head views follow, by default the model's top prediction for `text`;
    `block`: the neurons view's block (default the last); `top`: how many top tokens, neurons or
    neighbours to list; `method`: the heads view's, one of `HEADS_METHODS`.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of: {', '.join(VIEWS)}")
    if method not in HEADS_METHODS:
        raise ValueError(f"unknown heads method {method!r}; choose one of: {', '.join(HEADS_METHODS)}")
    if view == "patch" and corrupt is None:
        raise ValueError("the patch view needs a corrupted text (--corrupt TEXT) with as many tokens as the "
                         "clean one")
    top = DEFAULT_TOP.get(view, 5) if top is None else top
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    ids = tokenizer.encode(text)
    if ids or view != "embeddings":  # (no text for the embedding map: the most frequent tokens)
        views.as_ids(model, ids)  # empty, too long or unknown ids: refused before any view runs
    result = {"view": view, "tokens": _tokens(tokenizer, ids)}
    if view == "logit-lens":
        logprobs, indices = views.logit_lens_top(model, ids, top)
        names = output_names(model, tokenizer, indices.flatten().tolist())
        cells = iter(names)
        result["rows"] = ["embeddings"] + [f"block {i}" for i in range(model.config.n_layers)]
        result["top"] = [[[{"id": i, "text": next(cells), "logprob": lp}
                           for i, lp in zip(position_ids, position_lps, strict=True)]
                          for position_ids, position_lps in zip(row_ids, row_lps, strict=True)]
                         for row_ids, row_lps in zip(indices.tolist(), logprobs.tolist(), strict=True)]
    elif view in ("patch", "heads"):
        corrupt_ids = tokenizer.encode(corrupt) if view == "patch" else None
        if view == "patch":
            views.as_ids(model, corrupt_ids)
            if len(corrupt_ids) != len(ids):
                raise ValueError(f"the clean and corrupted texts must have equal token counts: "
                                 f"{len(ids)} and {len(corrupt_ids)}")
        target_id = pick_target(model, tokenizer, ids, target)
        result["target"] = {"id": target_id, "text": output_names(model, tokenizer, [target_id])[0]}
        if view == "patch":
            result["corrupt_tokens"] = _tokens(tokenizer, corrupt_ids)
            result["clean_logit"] = views.target_logit(model, ids, target_id)
            result["corrupt_logit"] = views.target_logit(model, corrupt_ids, target_id)
            result["logits"] = views.patch_residual(model, ids, corrupt_ids, target_id).tolist()
        else:
            silenced = views.ablate_heads if method == "exact" else views.attribute_heads
            result["method"] = method
            result["logit"] = views.target_logit(model, ids, target_id)
            result["logits"] = silenced(model, ids, target_id).tolist()
    elif view == "residual":
        found = views.residual_contributions(model, ids)
        result.update(names=found["names"], norms=found["norms"].tolist())
    elif view == "neurons":
        found = views.top_neurons(model, ids, model.config.n_layers - 1 if block is None else block, k=top)
        for neuron in found["neurons"]:
            neuron["tokens"] = tokenizer.token_strings(neuron["token_ids"])
        result.update(block=found["block"], neurons=found["neurons"])
    else:
        for name, part in views.embedding_map(model, ids or None, k=top).items():
            shown = {"ids": part["ids"], "xy": part["xy"].tolist(), "explained": part["explained"].tolist(),
                     "neighbours": part["neighbours"].tolist(), "similarity": part["similarity"].tolist()}
            if name == "tokens":
                shown["texts"] = tokenizer.token_strings(part["ids"])
                shown["neighbour_texts"] = [tokenizer.token_strings(row) for row in shown["neighbours"]]
            result[f"{name[:-1]}_map"] = shown  # "token_map", "position_map"
    return result


# ---------------------------------------------------------------- the terminal

def _shown(text: str) -> str:
    """A token as it reads best in a cell: bare, or quoted where spaces at its ends would vanish."""
    return repr(text)[1:-1] if text.strip() == text and text else repr(text)


def print_report(result: dict, console=None) -> None:
    """Draw a `report` as rich tables, with a line under each saying how to read it."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    view, tokens = result["view"], [_shown(t["text"]) for t in result["tokens"]]

    def table(title: str, first: str, columns: list[str], caption: str) -> Table:
        grid = Table(title=Text(title), caption=Text(caption), show_edge=False, pad_edge=False,
                     caption_justify="left")
        grid.add_column(first)
        for column in columns:
            grid.add_column(column, justify="right")
        return grid

    def heat(value: float, low: float, high: float) -> str:
        share = 0.0 if high <= low else (value - low) / (high - low)
        return "bold green" if share > 0.75 else "green" if share > 0.5 else "dim" if share < 0.25 else ""

    if view == "logit-lens":
        grid = table("logit lens: the top next token read after each depth", "token", result["rows"],
                     "Read a row left to right: where the guess settles is where the model decided. "
                     "The last column is the model's real prediction.")
        for position, token in enumerate(tokens):
            cells = []
            for row in result["top"]:
                best = row[position][0]
                probability = math.exp(best["logprob"])
                cells.append(Text(f"{_shown(best['text'])} {probability:.0%}",
                                  style=heat(probability, 0.0, 1.0)))
            grid.add_row(Text(token), *cells)
    elif view == "patch":
        clean, corrupt = result["clean_logit"], result["corrupt_logit"]
        target = repr(result["target"]["text"])
        grid = table(f"activation patching: the logit of {target} when the clean stream is patched in",
                     "clean / corrupt", [f"block {i}" for i in range(len(result["logits"]))],
                     f"clean text: {clean:.3f}, corrupted: {corrupt:.3f}. A green cell restores the clean "
                     "answer: the information that decides it flows through that block at that token.")
        corrupt_tokens = [_shown(t["text"]) for t in result["corrupt_tokens"]]
        for position, (a, b) in enumerate(zip(tokens, corrupt_tokens, strict=True)):
            row = [r[position] for r in result["logits"]]
            low, high = min(clean, corrupt), max(clean, corrupt)
            grid.add_row(Text(a if a == b else f"{a} / {b}"),
                         *[Text(f"{v:.3f}", style=heat(v, low, high)) for v in row])
    elif view == "heads":
        baseline, target = result["logit"], repr(result["target"]["text"])
        estimated = result.get("method") == "attribution"
        grid = table(f"head ablation: the change in the logit of {target} when one head is silenced"
                     + (" (estimated by attribution patching)" if estimated else ""),
                     "", [f"head {h}" for h in range(len(result["logits"][0]))],
                     f"baseline {baseline:.3f}. Red: the prediction needed that head; "
                     "green: the head was arguing against it."
                     + (" A first-order estimate: confirm a cell with --method exact." if estimated else ""))
        changes = [v - baseline for row in result["logits"] for v in row]
        scale = max(map(abs, changes)) or 1.0
        for layer, row in enumerate(result["logits"]):
            grid.add_row(f"block {layer}", *[
                Text(f"{v - baseline:+.3f}", style=("red" if v < baseline else "green")
                     if abs(v - baseline) > 0.25 * scale else "dim") for v in row])
    elif view == "residual":
        grid = table("what writes into the residual stream: the norm of each part's vector", "part", tokens,
                     "Compare down a column: the longest vectors write most at that token.")
        columns = list(zip(*result["norms"], strict=True))
        for name, row in zip(result["names"], result["norms"], strict=True):
            grid.add_row(name, *[Text(f"{v:.2f}", style=heat(v, min(column), max(column)))
                                 for v, column in zip(row, columns, strict=True)])
    elif view == "neurons":
        grid = table(f"block {result['block']}: the feed-forward units that fire most", "unit",
                     ["peak", "fires on (activation)"],
                     "A unit that fires on tokens of one kind has learned a feature of the text.")
        for neuron in result["neurons"]:
            fires = ", ".join(f"{_shown(t)} ({a:.2f})"
                              for t, a in zip(neuron["tokens"], neuron["activations"], strict=True))
            grid.add_row(str(neuron["neuron"]), f"{neuron['peak']:.3f}", Text(fires))
    else:
        part = result["token_map"]
        x, y = part["explained"]
        grid = table("token embeddings: a 2-D map (PCA) and nearest neighbours", "token",
                     ["x", "y", "nearest tokens (cosine similarity)"],
                     f"The two axes hold {x:.0%} and {y:.0%} of these tokens' variance. Tokens the model "
                     "uses alike sit close and are each other's neighbours.")
        for text, (px, py), names, similarity in zip(part["texts"], part["xy"], part["neighbour_texts"],
                                                     part["similarity"], strict=True):
            near = ", ".join(f"{_shown(n)} ({s:.2f})" for n, s in zip(names, similarity, strict=True))
            grid.add_row(Text(_shown(text)), f"{px:.3f}", f"{py:.3f}", Text(near))
        positions = result["position_map"]
        console.print(grid)
        grid = table("position embeddings: nearest positions", "position", ["x", "y", "nearest positions"],
                     "A trained model's neighbouring positions lie next to each other (the first 8 shown).")
        first = slice(0, 8)
        for index, (px, py), near in zip(positions["ids"][first], positions["xy"][first],
                                         positions["neighbours"][first], strict=True):
            grid.add_row(str(index), f"{px:.3f}", f"{py:.3f}", ", ".join(map(str, near)))
    console.print(grid)
