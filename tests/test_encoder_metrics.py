"""Encoder metrics on tiny hand-computed cases (``eval.encoder.metrics``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.encoder.metrics import box_grounding, region_classification, retrieval_recall


def test_region_classification_accuracy_and_mean_class_accuracy():
    classes = torch.eye(3)  # class c is the direction e_c
    # Class 0: 3 regions, 2 right; class 1: 1 region, right; class 2: never appears.
    regions = torch.tensor([[1.0, 0.1, 0], [2.0, 0, 0.5], [0.1, 1.0, 0], [0, 3.0, 0.2]])
    labels = torch.tensor([0, 0, 0, 1])
    result = region_classification(regions, classes, labels, class_names=["cat", "dog", "cow"])
    assert result["accuracy"] == pytest.approx(3 / 4)
    assert result["mean_class_accuracy"] == pytest.approx((2 / 3 + 1) / 2)  # over classes present only
    assert result["num_regions"] == 4 and result["num_classes"] == 2
    assert result["per_class"] == {
        "cat": {"accuracy": pytest.approx(2 / 3), "count": 3},
        "dog": {"accuracy": 1.0, "count": 1},
    }


def test_region_classification_is_cosine_not_dot_product_and_takes_numpy():
    # Unnormalised, class 1's long vector would win a dot product; by cosine class 0 wins.
    classes = np.array([[1.0, 0.0], [10.0, 10.0]])
    result = region_classification(np.array([[1.0, 0.2]]), classes, np.array([0]))
    assert result["accuracy"] == 1.0 and result["per_class"] == {0: {"accuracy": 1.0, "count": 1}}


def test_region_classification_checks_inputs():
    with pytest.raises(ValueError, match="labels must lie"):
        region_classification(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="embedding sizes differ"):
        region_classification(torch.eye(2), torch.eye(3), torch.tensor([0, 1]))


def test_retrieval_recall_ranks_and_ties():
    gallery = torch.tensor([[1.0, 0], [0, 1.0], [0.7, 0.7], [-1.0, 0]])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # q0: correct item 0 is the best match -> rank 0.
    # q1: correct item 3 is the worst -> 3 wrong items above it.
    # q2: correct item 2 (cos 0.707) is beaten by item 1 (cos 1) -> rank 1.
    result = retrieval_recall(queries, gallery, [[0], [3], [2]], ks=(1, 2, 10))
    assert result == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@10": 1.0, "num_queries": 3}


def test_retrieval_recall_several_positives_and_mask_layout():
    gallery = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]])
    queries = torch.tensor([[1.0, 0.0]])
    # The two near-duplicate items both count as correct: the best of them decides the rank.
    assert retrieval_recall(queries, gallery, [[1, 0]])["R@1"] == 1.0
    mask = np.array([[False, True, False]])
    assert retrieval_recall(queries, gallery, mask, ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0, "num_queries": 1}


def test_retrieval_recall_ties_count_against_the_query():
    collapsed = torch.ones(4, 3)
    result = retrieval_recall(collapsed, collapsed, [[i] for i in range(4)], ks=(1, 4))
    assert result["R@1"] == 0.0 and result["R@4"] == 1.0


def test_retrieval_recall_needs_a_positive_per_query():
    with pytest.raises(ValueError, match="query 1 has no correct gallery item"):
        retrieval_recall(torch.eye(2), torch.eye(2), [[0], []])


def test_box_grounding_accuracy_and_miou():
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    pred = torch.tensor(
        [
            [0.0, 0.0, 0.5, 0.5],  # IoU 1
            [0.0, 0.0, 1.0, 0.5],  # IoU 0.5 (counts: >= threshold)
            [0.0, 0.0, 0.5, 0.5],  # IoU 0
        ]
    )
    result = box_grounding(pred, gt)
    assert result == {"acc@0.5": pytest.approx(2 / 3), "miou": pytest.approx(0.5), "num_boxes": 3}
    assert box_grounding(pred, gt, threshold=0.75)["acc@0.75"] == pytest.approx(1 / 3)
    assert box_grounding(np.zeros((0, 4)), np.zeros((0, 4))) == {"acc@0.5": 0.0, "miou": 0.0, "num_boxes": 0}
