"""Opacus's DPLSTM / DPGRU / DPRNN (what dpclip's error for nn.LSTM recommends) train
exactly: their RNNLinear cells are nn.Linear subclasses run once per time step, and the
RNN module also owns its cells' weights under second names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from opacus.layers import DPGRU, DPLSTM, DPRNN

from tests.dpclip.per_example import K, relative_error

B, T, FEATURES, HIDDEN, CLASSES = 3, 5, 4, 6, 3


class Sequences(nn.Module):
    """Sequences [B, T, FEATURES] → class logits from the last hidden state."""

    def __init__(self, rnn: type[nn.Module], layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = rnn(FEATURES, HIDDEN, num_layers=layers, batch_first=True,
                       bidirectional=bidirectional)
        self.head = nn.Linear(HIDDEN * (1 + bidirectional), CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
@pytest.mark.parametrize("style", [1, 2])
@pytest.mark.parametrize(
    "rnn, layers, bidirectional",
    [(DPLSTM, 1, False), (DPLSTM, 2, True), (DPGRU, 2, False), (DPRNN, 1, True)],
)
def test_dp_rnn_update_equals_one_example_at_a_time_reference(rnn, layers, bidirectional,
                                                              style, clipping):
    torch.manual_seed(0)
    model = Sequences(rnn, layers, bidirectional).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(K * B, T, FEATURES, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (K * B,), generator=gen)
    assert relative_error(model, (x,), y, style, B, clipping) < 1e-10
