"""Sample quality of digit images, measured independently of the network that drew them.

A small classifier (:class:`DigitsClassifier`, an MLP on the 64 pixels) is trained, seeded, on the real
digits; its 64-d penultimate activations are the feature space of a Frechet distance
(:func:`frechet_distance`, the FID recipe at digit scale) and its softmax gives confidence and, for
class-conditional samples, whether the requested digit came out. :func:`real_floor` is the same distance
between real digits and the real set: the value a perfect sampler reaches with that many samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class DigitsClassifier(nn.Module):
    """MLP 64 -> 128 -> 64 -> 10 on digit images [N, 1, 8, 8] in [-1, 1]; ``features`` is the 64-d layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d feature vector of each image."""
        return self.body(x.reshape(x.shape[0], -1).to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, 10]."""
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 200, seed: int = 0) -> DigitsClassifier:
    """Full-batch Adam on the given digits, seeded; about a second on 2 CPU cores."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    clf = DigitsClassifier()
    torch.random.set_rng_state(gen_state)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
    x = images.reshape(images.shape[0], -1).to(torch.float32)
    noise = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # A little pixel noise so the features do not hinge on exact grey levels samples never hit.
        loss = nn.functional.cross_entropy(clf(x + 0.1 * torch.randn(x.shape, generator=noise)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return clf.eval().requires_grad_(False)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` [N, d] and ``b`` [M, d] (float64).

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, the matrix square roots by symmetric
    eigendecomposition (no scipy needed).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"a and b must be [N, d] feature sets with the same d and N >= 2, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a, b = a.to(torch.float64), b.to(torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * inner)


@dataclass
class DigitsScore:
    """Quality of a set of digit samples: Frechet distance to the real digits (lower is better), mean
    classifier confidence, and (for labelled samples) the share classified as the requested label."""

    fd: float
    confidence: float
    accuracy: float | None = None


class DigitsJudge:
    """Scores digit samples against the real digits with a classifier trained on them (see module docstring)."""

    def __init__(self, seed: int = 0) -> None:
        from fastdiff.pretrained.train import load_digits_dataset

        self.images, self.labels = load_digits_dataset()
        self.classifier = train_classifier(self.images, self.labels, seed=seed)
        with torch.no_grad():
            self.real_features = self.classifier.features(self.images)
            self.train_accuracy = float((self.classifier(self.images).argmax(1) == self.labels).float().mean())

    def score(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> DigitsScore:
        """Scores samples [N, 1, 8, 8] in [-1, 1] (values are clamped to that range first, as an image would be)."""
        if samples.dim() != 4 or tuple(samples.shape[1:]) != (1, 8, 8):
            raise ValueError(f"samples must be [N, 1, 8, 8], got {tuple(samples.shape)}")
        x = samples.detach().to("cpu", torch.float32).clamp(-1, 1)
        with torch.no_grad():
            feats = self.classifier.features(x)
            probs = self.classifier.head(feats).softmax(1)
        acc = None if labels is None else float((probs.argmax(1) == labels.to("cpu")).float().mean())
        return DigitsScore(
            fd=frechet_distance(feats, self.real_features), confidence=float(probs.max(1).values.mean()), accuracy=acc
        )

    def real_floor(self, n: int, draws: int = 8, seed: int = 0) -> float:
        """The mean Frechet distance of ``n`` real digits (drawn without replacement, ``draws`` times) to the real
        set: what a perfect sampler scores with ``n`` samples. At n = 128 single draws range from 6 to 26,
        hence the mean."""
        gen = torch.Generator().manual_seed(seed)
        fds = [self.score(self.images[torch.randperm(len(self.images), generator=gen)[:n]]).fd for _ in range(draws)]
        return float(sum(fds) / len(fds))
