"""A LightningModule around ``support.mlp_charges.mlp`` (float64, SGD with momentum and weight
decay) and its data, importable by the processes ``strategy="ddp_spawn"`` starts."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from support.mlp_charges import mlp


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(seed=0).double()
        g = torch.Generator().manual_seed(1)
        self.example_input_array = torch.randn(16, 8, generator=g, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def loader(n: int = 160, batch_size: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
