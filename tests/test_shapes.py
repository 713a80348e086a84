import numpy as np
import pytest

from raycv.data import shapes
from raycv.data.shapes import DIFFICULTIES, SHAPE_CLASSES, class_names, render, render_range

SIZE = 48


def options(level: str, **overrides) -> dict:
    return {"image_size": SIZE, "num_classes": 6, "difficulty": level, "seed": 0, **overrides}


@pytest.fixture(scope="module")
def samples() -> dict[str, list[dict]]:
    return {d: [render(i, **options(d)) for i in range(200)] for d in DIFFICULTIES}


def tight_box(mask: np.ndarray) -> list[int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_class_names_are_the_first_classes():
    assert len(SHAPE_CLASSES) >= 10
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert class_names(6) == list(SHAPE_CLASSES[:6])
    assert class_names(len(SHAPE_CLASSES)) == list(SHAPE_CLASSES)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_same_seed_and_index_give_identical_samples(difficulty):
    first, second = render(7, **options(difficulty)), render(7, **options(difficulty))
    assert first["label"] == second["label"]
    for key in ("image", "boxes", "labels", "masks"):
        np.testing.assert_array_equal(first[key], second[key])


def test_different_seed_or_index_changes_the_image():
    image = render(7, **options("easy"))["image"]
    assert not np.array_equal(image, render(7, **options("easy", seed=1))["image"])
    assert not np.array_equal(image, render(8, **options("easy"))["image"])


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_types_and_shapes(samples, difficulty):
    for sample in samples[difficulty][:20]:
        n = len(sample["labels"])
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (SIZE, SIZE, 3)
        assert isinstance(sample["label"], int)
        assert sample["boxes"].dtype == np.float32 and sample["boxes"].shape == (n, 4)
        assert sample["labels"].dtype == np.int64
        assert sample["masks"].dtype == np.uint8 and sample["masks"].shape == (n, SIZE, SIZE)
        assert set(np.unique(sample["masks"])) <= {0, 1}


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_every_class_appears_and_labels_lie_in_range(samples, difficulty):
    labels = [s["label"] for s in samples[difficulty]]
    assert sorted(set(labels)) == list(range(6))
    for sample in samples[difficulty]:
        assert sample["labels"][0] == sample["label"]
        distractors = sample["labels"][1:]
        assert np.all((distractors >= 0) & (distractors < 6))
        assert sample["label"] not in distractors


def test_twelve_classes_all_appear():
    labels = render_range(0, 300, **options("easy", num_classes=len(SHAPE_CLASSES)))["label"]
    assert sorted(set(labels)) == list(range(len(SHAPE_CLASSES)))


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_boxes_are_the_tight_boxes_of_visible_masks(samples, difficulty):
    for sample in samples[difficulty]:
        boxes, masks = sample["boxes"], sample["masks"]
        assert np.all(boxes >= 0) and np.all(boxes <= SIZE)
        assert np.all(boxes[:, 2:] > boxes[:, :2])
        for box, mask in zip(boxes, masks, strict=True):
            assert box.tolist() == tight_box(mask)
        # Occlusion leaves each pixel to at most one object.
        assert masks.sum(axis=0).max() <= 1


@pytest.mark.parametrize("difficulty", ["medium", "hard"])
def test_kept_distractors_have_enough_visible_pixels(samples, difficulty):
    for sample in samples[difficulty]:
        assert np.all(sample["masks"][1:].sum(axis=(1, 2)) >= 20)


@pytest.mark.parametrize(("difficulty", "share"), [("easy", 1.0), ("medium", 0.7), ("hard", 0.5)])
def test_main_object_stays_mostly_visible(difficulty, share):
    occluded = 0
    for index in range(200):
        sample, drawn = shapes._render(index, **options(difficulty))
        visible = int(sample["masks"][0].sum())
        assert visible >= 12
        assert visible >= share * drawn[0]
        occluded += visible < drawn[0]
    if difficulty == "hard":
        assert occluded > 10


def test_main_object_is_visible_at_the_smallest_size():
    for index in range(100):
        sample = render(index, **options("hard", image_size=16))
        assert sample["masks"][0].sum() >= 4


def test_difficulty_changes_size_count_and_contrast(samples):
    def main_area(d):
        return np.mean([np.prod(s["boxes"][0, 2:] - s["boxes"][0, :2]) for s in samples[d]])

    def objects(d):
        return np.mean([len(s["labels"]) for s in samples[d]])

    assert main_area("easy") > 1.5 * main_area("medium") > 1.5 * main_area("hard")
    assert all(len(s["labels"]) == 1 for s in samples["easy"])
    assert objects("easy") < objects("medium") < objects("hard")
    assert objects("hard") > 1.5


def test_easy_objects_stand_out_more_than_hard_ones(samples):
    def contrast(d):
        gaps = []
        for s in samples[d]:
            image, inside = s["image"].astype(float), s["masks"][0].astype(bool)
            outside = s["masks"].sum(axis=0) == 0
            gaps.append(np.linalg.norm(image[inside].mean(0) - image[outside].mean(0)))
        return np.mean(gaps)

    assert contrast("easy") > contrast("hard") + 40


def test_render_range_matches_render():
    columns = render_range(3, 6, **options("medium"))
    assert sorted(columns) == sorted(shapes.COLUMNS)
    assert all(len(column) == 3 for column in columns.values())
    for offset, index in enumerate(range(3, 6)):
        expected = render(index, **options("medium"))["image"]
        np.testing.assert_array_equal(columns["image"][offset], expected)
    assert render_range(5, 5, **options("easy")) == {key: [] for key in shapes.COLUMNS}


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"image_size": 15}, "image_size"),
        ({"difficulty": "extreme"}, "difficulty"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": len(SHAPE_CLASSES) + 1}, "num_classes"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_name_themselves(overrides, name):
    with pytest.raises(ValueError, match=name) as error:
        render(0, **options("easy", **overrides))
    assert str(overrides[name]) in str(error.value)


def test_invalid_index_and_class_count_are_rejected():
    with pytest.raises(ValueError, match="index"):
        render(-1, **options("easy"))
    with pytest.raises(ValueError, match=r"num_classes must be in \[2, 12\]"):
        class_names(13)
