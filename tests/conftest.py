import pytest
import torch

import leantune as lt


@pytest.fixture
def tiny_llama():
    return lt.load_model("tiny-llama")


@pytest.fixture
def tokens():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (2, 12), generator=generator)


class TwoLayer(torch.nn.Module):
    """A plain module (not Hugging Face) with nn.Linear layers."""

    def __init__(self, dim=16, hidden=24, bias=True):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden, bias=bias)
        self.down = torch.nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def plain_module():
    torch.manual_seed(0)
    return TwoLayer()


def randomize_adapter(model, scale=0.1, seed=1):
    """Trainable tensors start at zero for most methods; tests need non-trivial adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
