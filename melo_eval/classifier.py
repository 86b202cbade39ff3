"""The label-shift base model: MiniLM with a classifier head trained on the upstream split.

GRACE's protocol trains the base classifier on the early period and then edits it on the later
one. We keep the pretrained encoder frozen and fit only the linear head on the pooled outputs
(cached once), which is fast on a CPU and leaves every encoder layer -- where MELO's key and LoRA
layers live -- exactly as pretrained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from melo_eval import datasets
from melo_eval.lm import chunks


@torch.no_grad()
def pooled_features(model, tokenizer, texts: list[str], max_length: int = 256, batch: int = 32) -> torch.Tensor:
    """The (dropout-free) pooled representation the classification head reads."""
    outputs = []
    for part in chunks(len(texts), batch):
        enc = tokenizer(texts[part], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        outputs.append(model.bert(**enc).pooler_output)
    return torch.cat(outputs)


def fit_head(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, epochs: int = 300, seed: int = 0) -> float:
    """Full-batch Adam on cross-entropy with a little weight decay; returns the training accuracy."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = nn.functional.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return float((head(features).argmax(-1) == labels).float().mean())


def trained_classifier(backbone: str, dataset: str, data_dir: Path, seed: int = 0):
    """(model, tokenizer, report): ``backbone`` with a head fitted on ``dataset``'s upstream split."""
    from melo_runtime.backbones import load_backbone

    data = datasets.read_label_shift(dataset, data_dir)
    model, tokenizer = load_backbone(backbone, labels=data.labels)
    label2id = {name: i for i, name in enumerate(data.labels)}
    texts = [p.prompt for p in data.upstream]
    targets = torch.tensor([label2id[p.target] for p in data.upstream])
    train_acc = fit_head(model.classifier, pooled_features(model, tokenizer, texts), targets, seed=seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return model, tokenizer, {"upstream_items": len(texts), "upstream_train_accuracy": train_acc}
