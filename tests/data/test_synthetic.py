"""The synthetic demo set's class names and the fixed hue classifier that scores demo samples."""

import pytest
import torch
import torch.nn.functional as F

from reglue.data.synthetic import HueClassifier, SyntheticShapes


@pytest.fixture(scope="module")
def dataset():
    return SyntheticShapes(4096, 8, 64, seed=0)


@pytest.fixture(scope="module")
def classifier(dataset):
    return dataset.classifier()


@pytest.fixture(scope="module")
def held_out(dataset):
    """512 images the classifier's class means were not computed from (it uses the first 512)."""
    images, labels = zip(*(dataset[i] for i in range(2048, 2048 + 512)))
    return torch.stack(images), torch.tensor(labels)


def block_blur(images, factor):
    """Each factor x factor block replaced by its mean colour (what a coarse latent keeps)."""
    return F.interpolate(F.avg_pool2d(images.float(), factor), scale_factor=factor).round().to(torch.uint8)


def test_classifier_accuracy_on_real_blurred_and_noise_images(classifier, held_out):
    images, labels = held_out
    # measured (seed 0): 99.6% real, 96% at 8x blur, 12.5% noise (chance: 8 classes, labels cycling)
    assert classifier.accuracy(images, labels) >= 0.97
    assert classifier.accuracy(block_blur(images, 8), labels) >= 0.9
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert classifier.accuracy(noise, labels) <= 0.2
    grey = images.float().mean(1, keepdim=True).expand_as(images).to(torch.uint8)
    assert classifier.accuracy(grey, labels) <= 0.2, "the classes are told apart by hue"


def test_classifier_generalises_to_other_seeds_and_sizes(classifier):
    other = SyntheticShapes(512, 8, 64, seed=7)
    images, labels = zip(*(other[i] for i in range(256)))
    assert classifier.accuracy(torch.stack(images), torch.tensor(labels)) >= 0.97


def test_histograms_are_normalised_and_hue_binned():
    red = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = 255
    cyan = 255 - red
    hist = HueClassifier.histograms(torch.cat([red, cyan, torch.full_like(red, 128)]))
    assert torch.allclose(hist[:2].sum(1), torch.ones(2)) and hist[2].sum() == 0, "grey has no hue"
    assert hist[0].argmax() == 0 and hist[1].argmax() == HueClassifier.BINS // 2, "red at 0°, cyan at 180°"
    with pytest.raises(ValueError, match="no images of classes"):
        HueClassifier.fit(torch.cat([red, cyan]), torch.tensor([0, 1]), num_classes=3)


def test_class_names(dataset):
    assert dataset.class_names == ["red circle", "orange square", "lime triangle", "green cross", "cyan ring",
                                   "blue diamond", "violet bars", "magenta dots"]
    assert len(set(SyntheticShapes(64, 16, 64).class_names)) == 16
