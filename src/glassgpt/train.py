"""Training. (For now: the TinyGPT recipe used by the demo; the full Trainer follows.)"""

from __future__ import annotations

import torch

from glassgpt.model import GPT
from glassgpt.tokenizer import CharTokenizer

HELLO = "hello hello"


def train_tinygpt(epochs: int = 200, lr: float = 0.01, seed: int = 123) -> tuple[GPT, CharTokenizer, list[float]]:
    """Train the 2,453-parameter TinyGPT on "hello hello" (every window of 4 characters)."""
    torch.manual_seed(seed)
    tokenizer = CharTokenizer.from_text(HELLO)
    model = GPT.from_preset("tinygpt")
    ids = torch.tensor(tokenizer.encode(HELLO))
    window = model.config.context_length
    inputs = torch.stack([ids[i:i + window] for i in range(len(ids) - window)])
    targets = torch.stack([ids[i + 1:i + window + 1] for i in range(len(ids) - window)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), tokenizer, losses
