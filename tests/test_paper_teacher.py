"""Teacher maps for SAT (fastsat.train.teacher_saliency): the published methods and the SAT
authors' variants (style="authors", METHODS.md §6), each against a direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsat import saliency
from fastsat.train import TEACHER_METHODS, TEACHER_STYLES, teacher_saliency


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    ).eval()


def _data(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_gradient_sign_teacher_maps_are_the_sign_of_the_input_gradient():
    teacher, (images, _) = _teacher(), _data()
    maps = teacher_saliency(teacher, images, method="gradient_sign", batch_size=4, cache_dir=False)
    x = images.float() / 255
    assert torch.equal(maps, saliency.gradient(teacher, x).sign())
    # The authors' "guided backprop" is exactly that map; fastsat's guided backprop is not.
    authors = teacher_saliency(teacher, images, method="guided_backprop", style="authors", cache_dir=False)
    assert torch.equal(authors, maps)
    published = teacher_saliency(teacher, images, method="guided_backprop", cache_dir=False)
    assert torch.equal(published, saliency.guided_backprop(teacher, x).sign())
    assert not torch.equal(published, maps)


def test_authors_integrated_gradients_is_the_true_label_loss_scaled():
    teacher, (images, labels) = _teacher(), _data()
    maps = teacher_saliency(teacher, images, method="integrated_gradients", style="authors", labels=labels,
                            steps=8, batch_size=3, cache_dir=False)
    x = images.float() / 255
    direct = saliency.integrated_gradients(teacher, x, labels, steps=8, objective="loss")
    torch.testing.assert_close(maps, saliency.minmax_scale(direct), rtol=0, atol=1e-6)
    published = teacher_saliency(teacher, images, method="integrated_gradients", steps=8, cache_dir=False)
    torch.testing.assert_close(published, saliency.minmax_scale(saliency.integrated_gradients(teacher, x, steps=8)),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        teacher_saliency(teacher, images, method="integrated_gradients", style="authors", cache_dir=False)


def test_authors_gradcam_pp_has_no_relu_before_scaling():
    teacher, (images, _) = _teacher(), _data()
    x = images.float() / 255
    layer = teacher[0]  # activations of both signs, so the two styles differ
    maps = teacher_saliency(teacher, images, method="gradcam_pp", style="authors", layer=layer, cache_dir=False)
    torch.testing.assert_close(maps, saliency.minmax_scale(saliency.gradcam_pp(teacher, x, layer=layer, relu=False)),
                               rtol=0, atol=1e-6)
    published = teacher_saliency(teacher, images, method="gradcam_pp", layer=layer, cache_dir=False)
    assert not torch.allclose(maps, published)


def test_styles_cover_every_method_and_the_cache_keys_the_style(tmp_path):
    assert all(set(table) == set(TEACHER_METHODS) for table in TEACHER_STYLES.values())
    teacher, (images, _) = _teacher(), _data()
    for style in TEACHER_STYLES:
        teacher_saliency(teacher, images, method="guided_backprop", style=style, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("sat-maps-guided_backprop-*.pt"))) == 2
    with pytest.raises(ValueError, match="style"):
        teacher_saliency(teacher, images, style="paper", cache_dir=False)


def test_smoothgrad_teacher_maps_draw_fresh_noise_per_batch():
    """The seed is the base of the stream: two batches of the same images get different noise
    (they got identical maps when every batch reused seed 0), and the whole run repeats."""
    teacher, (images, _) = _teacher(), _data(4)
    twice = torch.cat([images, images])
    maps = teacher_saliency(teacher, twice, method="smoothgrad", batch_size=4, cache_dir=False)
    assert not torch.equal(maps[:4], maps[4:])
    assert torch.equal(maps, teacher_saliency(teacher, twice, method="smoothgrad", batch_size=4, cache_dir=False))
    first = teacher_saliency(teacher, images, method="smoothgrad", batch_size=4, cache_dir=False)
    assert torch.equal(maps[:4], first), "the first batch keeps the base seed"
