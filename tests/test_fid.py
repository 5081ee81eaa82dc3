"""In-domain FID/KID: the shipped feature network, real-vs-real near zero, monotone in damage."""
import numpy as np
import pytest
import torch

from pixforge.eval.metrics import FEATURE_WEIGHTS, ShapesFeatureNet, fid, kid, load_feature_net, to_uint8_batch
from pixforge.shapes import degrade
from pixforge.shapes.world import WorldConfig, sample

CONFIG = WorldConfig(canvas_sizes=((128, 128), (144, 112), (160, 96)), background_prob=0.3)
N = 120


@pytest.fixture(scope="module")
def net():
    return load_feature_net()


@pytest.fixture(scope="module")
def real():
    return [sample(i, "test", CONFIG).image for i in range(N)], [sample(i + N, "test", CONFIG).image for i in range(N)]


def test_shipped_weights_are_small_and_load():
    assert FEATURE_WEIGHTS.stat().st_size < 2_000_000
    assert isinstance(load_feature_net(), ShapesFeatureNet)


def test_features_have_the_declared_width_for_any_canvas(net):
    images = [sample(i, "test", WorldConfig(canvas_sizes=((96, 160),))).image for i in range(3)]
    features = net(to_uint8_batch(images))
    assert features.shape == (3, ShapesFeatureNet.num_features)
    assert torch.equal(features, net(to_uint8_batch(images)))


def test_real_versus_real_is_far_below_a_content_shift(net, real):
    first, second = real
    same = fid(first, second, net)
    counting_only = [sample(i, "test", WorldConfig(mix=(("counting", 1.0),))).image for i in range(N)]
    assert same < 0.3 * fid(first, counting_only, net)
    same_kid, _ = kid(first, second, net, subset_size=50, subsets=20)
    shifted_kid, _ = kid(first, counting_only, net, subset_size=50, subsets=20)
    assert abs(same_kid) < 0.2 * shifted_kid


def test_fid_grows_monotonically_with_degradation_strength(net, real):
    # Strengths are multiples of degrade.py's strength 1. With 300 images per side FID is
    # monotone from strength 0.5 up (docs/evaluation.md); with the 120 here, strengths below 2
    # sit inside the sampling noise, so the test steps from 0 to 2, 4 and 8.
    first, second = real
    scores = [fid(first, [degrade.degrade(im, s, np.random.default_rng(i)) for i, im in enumerate(second)], net)
              for s in (0.0, 2.0, 4.0, 8.0)]
    assert scores == sorted(scores) and scores[-1] > 2 * scores[0]
