from __future__ import annotations

import torch

from remote.config import parse_config
from remote.models import DamageCNN, Probability, SeedNet, build_model


def test_default_network_shapes_and_literature_size():
    model = DamageCNN()
    logits = model(torch.rand(3, 3, 128, 128) * 255)
    assert logits.shape == (3,)
    # 128 -> 126/63 -> 61/30 -> 28/14 -> 12/6: 128 * 6 * 6 features into Dense 512
    assert model.head[1].in_features == 128 * 6 * 6
    assert model.head[1].out_features == 512


def test_width_and_depth_are_parameters():
    config = parse_config(["--data_uri", "x", "--conv_filters", "8,16", "--dense_units", "10", "--image_size", "64"])
    model = build_model(config)
    assert isinstance(model, DamageCNN)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2,)
    assert model.head[1].out_features == 10


def test_seed_network_matches_the_keras_layers():
    model = SeedNet()
    assert model(torch.zeros(2, 3, 128, 128)).shape == (2,)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 16, 32]
    assert convs[2].groups == 16 and convs[2].bias is None  # depthwise half of the separable conv
    # Keras param count of this network: 224 + 1168 + (144 + 544) + 1056 + 33 = 3169
    assert sum(p.numel() for p in model.parameters()) == 3169


def test_served_model_returns_probabilities():
    served = Probability(SeedNet()).eval()
    out = served(torch.zeros(4, 3, 32, 32))
    assert out.shape == (4, 1)
    assert bool(((out >= 0) & (out <= 1)).all())
