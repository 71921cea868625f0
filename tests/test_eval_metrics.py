"""Evaluation metrics against hand-computed values on tiny fixed embeddings (ties included)."""

import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression
from sklearn.metrics import balanced_accuracy_score

from psdclip.eval.ranking import first_positive_rank
from psdclip.eval.retrieval import retrieval_metrics
from psdclip.eval.robustness import baseline_fit, effective_robustness, logit
from psdclip.eval.zeroshot import classification_metrics, classifier_weights


def test_first_positive_rank_breaks_ties_towards_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]] * 4)
    positives = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 0, 0, 1]]).bool()
    assert first_positive_rank(scores, positives).tolist() == [1, 2, 3, 0]


def test_first_positive_rank_matches_stable_sort_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 30), generator=generator).float()  # many ties
    positives = torch.rand(50, 30, generator=generator) < 0.1
    positives[:, 7] = True
    order = scores.argsort(dim=1, descending=True, stable=True)
    expected = positives.gather(1, order).int().argmax(dim=1)
    assert torch.equal(first_positive_rank(scores, positives), expected)


def test_first_positive_rank_needs_a_positive():
    with pytest.raises(ValueError, match="at least one positive"):
        first_positive_rank(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))


def test_classification_metrics_by_hand():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.1, 0.1, 0.1, 0.1],  # label 0: rank 0
            [0.5, 0.5, 0.2, 0.1, 0.0, 0.0],  # label 1: tied with class 0, which comes first → rank 1
            [0.5, 0.5, 0.2, 0.1, 0.0, 0.0],  # label 0: rank 0
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: rank 5, outside the top 5
        ]
    )
    labels = torch.tensor([0, 1, 0, 0])
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(2 / 4)
    assert metrics["top5"] == pytest.approx(3 / 4)
    # recall of class 0: 2 of 3; class 1: 0 of 1; classes without samples do not count
    assert metrics["mean_per_class_recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


def test_classification_metrics_without_top5_below_five_classes_and_bad_labels():
    metrics = classification_metrics(torch.tensor([[0.2, 0.1], [0.3, 0.4]]), torch.tensor([0, 0]))
    assert metrics == {"top1": 0.5, "mean_per_class_recall": 0.5}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        classification_metrics(torch.zeros(1, 2), torch.tensor([2]))


def test_classifier_weights_average_normalised_template_embeddings():
    table = {
        "a photo of cat": [3.0, 4.0],
        "a drawing of cat": [2.0, 0.0],
        "a photo of dog": [0.0, 5.0],
        "a drawing of dog": [0.0, 1.0],
    }
    texts = list(table)
    tokenizer = lambda strings: torch.tensor([texts.index(s) for s in strings])
    encode_text = lambda tokens: torch.tensor([table[texts[i]] for i in tokens.tolist()])
    weights = classifier_weights(encode_text, tokenizer, ["cat", "dog"], ["a photo of {c}", "a drawing of {c}"])
    # cat: mean of (0.6, 0.8) and (1, 0) = (0.8, 0.4), renormalised
    assert torch.allclose(weights, torch.tensor([[0.8, 0.4], [0.0, 1.0]]) / torch.tensor([[math.sqrt(0.8)], [1.0]]))


def test_retrieval_with_several_captions_per_image_and_ties():
    images = torch.eye(3)
    e0, e1, e2 = images
    texts = torch.stack([e0, F.normalize(e0 + e1, dim=0), F.normalize(e0 + e1, dim=0), e1, e2])
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 5))
    # text→image ranks: t0→i0: 0; t1→i0 (tied with i1, i0 first): 0; t2→i1 (tied, i0 first): 1; t3→i2 (i1 higher, i0 tied and first): 2; t4: 0
    assert metrics["t2i_r1"] == pytest.approx(3 / 5)
    assert metrics["t2i_r2"] == pytest.approx(4 / 5)
    assert metrics["t2i_r5"] == 1.0
    # image→text (hit if any caption of the image is in the top k): i0: t0 first → 0; i1: t3 higher, t1 tied and first → 2; i2: t4 → 0
    assert metrics["i2t_r1"] == pytest.approx(2 / 3)
    assert metrics["i2t_r2"] == pytest.approx(2 / 3)
    assert metrics["i2t_r5"] == 1.0
    assert metrics["r1"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert metrics["mean_recall"] == pytest.approx((metrics["r1"] + metrics["r2"] + metrics["r5"]) / 3)


def test_retrieval_chunks_agree_with_one_pass(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(120, 8, generator=generator), dim=-1)
    text_to_image = torch.arange(120) // 3
    whole = retrieval_metrics(images, texts, text_to_image)
    monkeypatch.setattr("psdclip.eval.retrieval.QUERIES_PER_CHUNK", 7)
    assert retrieval_metrics(images, texts, text_to_image) == whole


def test_effective_robustness_by_hand():
    result = effective_robustness(0.5, {"v2": 0.3, "sketch": 0.5}, slope=1.0, intercept=0.0)
    assert result["shifted_average"] == pytest.approx(0.4)
    assert result["baseline_prediction"] == pytest.approx(0.5)
    assert result["effective_robustness"] == pytest.approx(-0.1)
    # logit(0.7) = 0.8473; 0.8 * 0.8473 - 0.5 = 0.17783 → sigmoid = 0.54434
    result = effective_robustness(0.7, {"a": 0.6}, slope=0.8, intercept=-0.5)
    assert result["baseline_prediction"] == pytest.approx(0.54434, abs=1e-5)
    assert result["effective_robustness"] == pytest.approx(0.6 - 0.54434, abs=1e-5)
    assert effective_robustness(0.7, {"a": 0.6}, None, None) == {"shifted_average": 0.6}


def test_baseline_fit_matches_a_least_squares_line_in_logit_space():
    # two models: the line through their logits, by hand
    slope, intercept = baseline_fit([0.5, 0.7], [0.3, 0.6])
    assert slope == pytest.approx((logit(0.6) - logit(0.3)) / logit(0.7))
    assert intercept == pytest.approx(logit(0.3))
    # noisy points: scikit-learn's least squares on the same logits
    reference, shifted = [0.55, 0.62, 0.7, 0.78, 0.81], [0.31, 0.4, 0.44, 0.58, 0.57]
    line = LinearRegression().fit([[logit(p)] for p in reference], [logit(p) for p in shifted])
    assert baseline_fit(reference, shifted) == pytest.approx((line.coef_[0], line.intercept_))
    with pytest.raises(ValueError, match="at least two models"):
        baseline_fit([0.7, 0.7], [0.5, 0.6])


def test_text_to_image_gallery_is_the_captioned_images_only():
    e0, e1, e2 = torch.eye(3)
    images = torch.stack([e0, F.normalize(e0 + e1, dim=0), e2])  # image 1 has no caption
    texts = torch.stack([F.normalize(e0 + e1, dim=0), e2])  # captions of images 0 and 2
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 2]), ks=(1,))
    # t0 scores 1 with the uncaptioned image 1 and 0.71 with its own image 0: with image 1 in the gallery it would
    # rank its image second (R@1 = 1/2); CLIP_benchmark's gallery, the captioned images, leaves image 1 out
    assert metrics["t2i_r1"] == 1.0
    assert metrics["i2t_r1"] == 1.0


def test_classification_equals_clip_benchmark_on_shared_logits():
    zeroshot_classification = pytest.importorskip(
        "clip_benchmark.metrics.zeroshot_classification",
        reason="the dev dependency clip-benchmark (pip install -e '.[dev]')",
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 8, (300,), generator=generator)
    logits = torch.randn(300, 10, generator=generator) + 2 * F.one_hot(labels, 10)
    logits[:, 8:] += 1.0  # classes 8 and 9 have no samples but are predicted: their recall must not count
    ours = classification_metrics(logits, labels)
    # zeroshot_classification.accuracy's own float() of a one-element array fails on NumPy 2.4: its formula, here
    top5 = logits.topk(5, dim=1).indices.t() == labels
    assert ours["top1"] == pytest.approx(top5[:1].float().sum().item() / len(labels), abs=1e-6)
    assert ours["top5"] == pytest.approx(top5.float().sum().item() / len(labels), abs=1e-6)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        reference = zeroshot_classification.balanced_accuracy_score(labels, logits.argmax(axis=1))
    assert ours["mean_per_class_recall"] == pytest.approx(reference, abs=1e-6)


class FeatureLookup:
    """A 'model' for CLIP_benchmark whose images are feature rows and whose texts name their feature row."""

    def __init__(self, text_features):
        self.text_features = text_features

    def tokenizer(self, texts):
        return torch.tensor([int(text) for text in texts])

    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return self.text_features[tokens]


def test_retrieval_equals_clip_benchmark_on_shared_features():
    zeroshot_retrieval = pytest.importorskip(
        "clip_benchmark.metrics.zeroshot_retrieval",
        reason="the dev dependency clip-benchmark (pip install -e '.[dev]')",
    )
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(60, 16, generator=generator), dim=-1)
    captions_per_image = torch.randint(0, 4, (60,), generator=generator)  # some images have no caption
    text_to_image = torch.repeat_interleave(torch.arange(60), captions_per_image)
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(len(text_to_image), 16, generator=generator), dim=-1)
    ours = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10))
    # CLIP_benchmark's retrieval set holds the captioned images, each with its captions, in batches
    captioned = torch.unique(text_to_image)
    batches = [
        (
            images[captioned[i : i + 8]],
            [
                [str(t) for t in (text_to_image == j).nonzero().flatten().tolist()]
                for j in captioned[i : i + 8].tolist()
            ],
        )
        for i in range(0, len(captioned), 8)
    ]
    reference = zeroshot_retrieval.evaluate(
        FeatureLookup(texts), batches, FeatureLookup(texts).tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    for k in (1, 5, 10):
        assert ours[f"t2i_r{k}"] == pytest.approx(reference[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"i2t_r{k}"] == pytest.approx(reference[f"text_retrieval_recall@{k}"], abs=1e-6)
