"""The VAE of the VAE study (NNI structured pruners on MNIST)."""

from __future__ import annotations

import torch
from torch import nn

from deploykit.model.spec import InputSpec, register_model


class VAE(nn.Module):
    """fc1 784 -> 400; heads fc21 (mean) and fc22 (log-variance) 400 -> 20; fc3 20 -> 400; fc4 400 -> 784.

    Both heads feed one reparameterisation z = mu + exp(logvar / 2) * eps, so their channels are
    coupled: pruning latent channel k must remove it from fc21, fc22 and fc3's input together. In
    eval mode eps is 0 (the decoder sees the mean), which keeps inference and ONNX export
    deterministic while the graph still joins the heads.
    """

    def __init__(self, latent: int = 20, hidden: int = 400):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, 784)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(image))
        mu, logvar = self.fc21(h), self.fc22(h)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std) if self.training else torch.zeros_like(std)
        z = mu + std * eps
        return torch.sigmoid(self.fc4(torch.relu(self.fc3(z))))


def _sample_images(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.rand(batch_size, 784, generator=generator),)  # pixel intensities in [0, 1)


@register_model("vae", inputs=[InputSpec("image", ("batch", 784))], outputs=["reconstruction"],
                sampler=_sample_images, output_layers=["fc4"])
def vae() -> nn.Module:
    """VAE (VAE study): 784 -> 400 -> {20, 20} -> 20 -> 400 -> 784, 652,824 parameters, 651,200 MACs."""
    return VAE()
