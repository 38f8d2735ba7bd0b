"""A small MLP regressor (the AMQ reference's: 3 hidden layers of 300, ReLU, dropout 0.2, Adam, smooth L1)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from amq.predictors.base import TargetTransform


class MLPPredictor:
    name = "mlp"

    def __init__(
        self,
        hidden: int = 300,
        layers: int = 3,
        dropout: float = 0.2,
        lr: float = 8e-4,
        epochs: int = 500,
        batch_size: int = 256,
        target: str = "log",
        seed: int = 0,
    ) -> None:
        self.transform = TargetTransform(target)
        self.hidden, self.layers, self.dropout = hidden, layers, dropout
        self.lr, self.epochs, self.batch_size, self.seed = lr, epochs, batch_size, seed
        self._net: nn.Module | None = None
        self._mu, self._sd = 0.0, 1.0

    def _build(self, n_in: int) -> nn.Module:
        mods: list[nn.Module] = []
        width = n_in
        for _ in range(self.layers):
            mods += [nn.Linear(width, self.hidden), nn.ReLU(), nn.Dropout(self.dropout)]
            width = self.hidden
        mods.append(nn.Linear(width, 1))
        return nn.Sequential(*mods)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "MLPPredictor":
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        Z = torch.tensor(np.atleast_2d(X).astype(np.float64), dtype=torch.float32)
        t = self.transform.forward(y)
        self._mu, self._sd = float(t.mean()), float(t.std() or 1.0)
        T = torch.tensor((t - self._mu) / self._sd, dtype=torch.float32).unsqueeze(1)
        net = self._build(Z.shape[1])
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)
        loss_fn = nn.SmoothL1Loss()
        net.train()
        for _ in range(self.epochs):
            perm = torch.randperm(len(Z), generator=gen)
            for s in range(0, len(Z), self.batch_size):
                idx = perm[s : s + self.batch_size]
                opt.zero_grad()
                loss_fn(net(Z[idx]), T[idx]).backward()
                opt.step()
            sched.step()
        net.eval()
        self._net = net
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self._net is None:
            raise RuntimeError("MLPPredictor.predict called before fit")
        with torch.no_grad():
            z = self._net(torch.tensor(np.atleast_2d(X).astype(np.float64), dtype=torch.float32)).squeeze(1).numpy()
        return self.transform.inverse(z.astype(np.float64) * self._sd + self._mu)
