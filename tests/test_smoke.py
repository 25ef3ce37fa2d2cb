import torch

import snopt


def test_odeint_matches_exponential_decay() -> None:
    class Decay(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

        def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return -self.k * x

    f = Decay()
    x0 = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.5], dtype=torch.float64)
    y = snopt.odeint(f, x0, t, rtol=1e-10, atol=1e-12)
    assert y.shape == (2, 1)
    y[-1].sum().backward()
    exact = torch.exp(torch.tensor(-0.7 * 1.5, dtype=torch.float64))
    assert torch.allclose(x0.grad, exact.reshape(1), rtol=1e-8)
    assert torch.allclose(f.k.grad, -1.5 * 2.0 * exact, rtol=1e-8)
