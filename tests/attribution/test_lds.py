"""The LDS metric (issue 19) equals dattri's implementation on the same arrays, ties and constant columns included."""

import pytest
import torch

from fgtrac_assets.attribution.lds import linear_datamodeling_score, random_subsets


def dattri_lds(scores, indices, outputs):
    from dattri.metric import lds

    return lds(scores, (outputs, indices))[0]


def test_lds_equals_dattri_on_random_arrays():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(60, 7, generator=g, dtype=torch.float64)
    masks = random_subsets(60, 50, 0.5, seed=1)
    indices = torch.stack([m.nonzero().flatten() for m in masks])
    truth = masks.double() @ scores * 0.5 + torch.randn(50, 7, generator=g, dtype=torch.float64)
    ours = linear_datamodeling_score(scores, masks, truth)
    assert torch.allclose(ours, dattri_lds(scores, indices, truth), atol=1e-12)
    assert torch.allclose(linear_datamodeling_score(scores, indices, truth), ours, atol=0)  # indices or masks
    assert ours.mean() > 0.3  # the scores do predict the outputs here


def test_ties_get_average_ranks_and_a_constant_output_has_no_correlation():
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    indices = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3], [0, 3]])
    outputs = torch.tensor([[1.0, 5.0], [2.0, 5.0], [1.0, 5.0], [3.0, 5.0], [0.5, 5.0]], dtype=torch.float64)
    ours = linear_datamodeling_score(scores, indices, outputs)
    with pytest.warns(Warning):  # scipy warns about the constant column
        theirs = dattri_lds(scores, indices, outputs)
    assert torch.allclose(ours[:1], theirs[:1], atol=1e-12)
    assert torch.isnan(ours[1]) and torch.isnan(theirs[1])


def test_subsets_have_the_asked_size_and_shapes_are_checked():
    masks = random_subsets(10, 4, 0.3, seed=2)
    assert masks.shape == (4, 10) and masks.sum(1).tolist() == [3, 3, 3, 3]
    assert not torch.equal(masks[0], masks[1]) or not torch.equal(masks[1], masks[2])
    with pytest.raises(ValueError, match="shapes do not match"):
        linear_datamodeling_score(torch.zeros(10, 2), masks, torch.zeros(4, 3))
