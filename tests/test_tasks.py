"""Detect answers <-> boxes: parsing, strict error reporting, pixel mapping, encode/format round trips."""

import random

import pytest

from paligemma.tasks import (
    Detection,
    encode_box,
    format_detections,
    leading_tokens,
    parse_detections,
    parse_loc_box,
    prompt_task,
    split_objects,
)


def _loc(*values):
    return "".join(f"<loc{v:04d}>" for v in values)


def test_multiple_objects_and_labels_with_spaces():
    answer = f"{_loc(0, 0, 1023, 1023)} red circle ; {_loc(100, 200, 300, 400)} big blue square"
    result = parse_detections(answer, (1023, 1023))
    assert result.errors == []
    assert result.objects == [Detection("red circle", [0.0, 0.0, 1023.0, 1023.0]),
                              Detection("big blue square", [200.0, 100.0, 400.0, 300.0])]
    label, box = result.objects[1]  # unpacks like a (label, box) pair
    assert label == "big blue square" and box == [200.0, 100.0, 400.0, 300.0]


def test_coordinates_map_to_the_original_non_square_image():
    # y values scale with the height (480), x values with the width (640); 1023 is the far edge.
    result = parse_detections(f"{_loc(1023, 0, 1023, 1023)} bar ; {_loc(0, 1023, 511, 1023)} edge", (640, 480))
    assert result.errors == []
    assert result.objects[0].box == [0.0, 480.0, 640.0, 480.0]
    assert result.objects[1].box == pytest.approx([640.0, 0.0, 640.0, 511 / 1023 * 480])


@pytest.mark.parametrize("answer", ["", "   ", "\n"])
def test_blank_answer_is_no_objects_and_no_errors(answer):
    result = parse_detections(answer, (100, 50))
    assert result.objects == [] and result.errors == []


@pytest.mark.parametrize("separator", [";", " ;", "; ", "  ;  "])
def test_separator_spacing_is_tolerated(separator):
    answer = f"{_loc(1, 2, 3, 4)} a{separator}{_loc(5, 6, 7, 8)}b"
    result = parse_detections(answer, (1023, 1023))
    assert result.errors == []
    assert [d.label for d in result.objects] == ["a", "b"]


def test_box_without_label_is_kept_with_empty_label():
    result = parse_detections(_loc(1, 2, 3, 4), (1023, 1023))
    assert result.objects == [Detection("", [2.0, 1.0, 4.0, 3.0])] and result.errors == []


@pytest.mark.parametrize("segment, reason", [
    (f"{_loc(1, 2, 3)} cat", "expected 4 location tokens, found 3"),
    (f"{_loc(1, 2, 3, 4, 5)} cat", "expected 4 location tokens, found 5"),
    (f"{_loc(500, 2, 400, 4)} cat", "min > max"),
    (f"{_loc(1, 600, 3, 500)} cat", "min > max"),
    ("<loc0001><loc0002><loc0003><loc1500> cat", "0..1023"),
    (f"{_loc(1, 2, 3, 4)}<seg001><seg002> cat", "segmentation tokens"),
    ("a cat sitting on a mat", "text without location tokens"),
    (f"cat {_loc(1, 2, 3, 4)}", "text before the location tokens"),
    (f"{_loc(1, 2, 3, 4)} cat {_loc(5)}", "location tokens inside the label"),
])
def test_malformed_segments_are_reported_with_their_text(segment, reason):
    good = f"{_loc(10, 20, 30, 40)} dog"
    result = parse_detections(f"{good} ; {segment} ; {good}", (1023, 1023))
    assert [d.label for d in result.objects] == ["dog", "dog"]  # the good ones survive
    assert len(result.errors) == 1
    assert reason in result.errors[0] and repr(segment) in result.errors[0]


def test_stray_separators_are_reported():
    result = parse_detections(f"{_loc(1, 2, 3, 4)} a ;; {_loc(1, 2, 3, 4)} b ;", (10, 10))
    assert [d.label for d in result.objects] == ["a", "b"]
    assert len(result.errors) == 2 and all("stray ';'" in e for e in result.errors)


def test_encode_box_rounds_like_big_vision_and_rejects_outside_boxes():
    assert encode_box([0, 0, 640, 480], (640, 480)) == _loc(0, 0, 1023, 1023)
    assert encode_box([320, 120, 320, 240], (640, 480)) == _loc(256, 512, 512, 512)  # 255.75 -> 256, 511.5 -> 512
    for bad in ([-1, 0, 10, 10], [0, 0, 641, 10], [0, 0, 10, 481], [10, 0, 5, 10]):
        with pytest.raises(ValueError, match="is not inside a 640x480 image"):
            encode_box(bad, (640, 480))
    with pytest.raises(ValueError, match=r"a box is \[x0, y0, x1, y1\]"):
        encode_box([0, 0, 1], (640, 480))


def test_format_then_parse_round_trips_within_a_pixel():
    rng = random.Random(0)
    for size in [(640, 480), (37, 1500), (1023, 1023), (224, 224)]:
        items = []
        for i in range(5):
            xs = sorted(rng.uniform(0, size[0]) for _ in range(2))
            ys = sorted(rng.uniform(0, size[1]) for _ in range(2))
            items.append((f"thing {i}", [xs[0], ys[0], xs[1], ys[1]]))
        result = parse_detections(format_detections(items, size), size)
        assert result.errors == []
        for (label, box), detection in zip(items, result.objects):
            assert detection.label == label
            # Rounding to 1024 bins: at most half a bin, size/2046 px (< 1 px up to 2046 px).
            assert detection.box == pytest.approx(box, abs=max(size) / 2046 + 1e-9)


def test_format_accepts_detections_and_rejects_unparseable_labels():
    detections = parse_detections(f"{_loc(1, 2, 3, 4)} a b", (1023, 1023)).objects
    assert format_detections(detections, (1023, 1023)) == f"{_loc(1, 2, 3, 4)} a b"
    assert format_detections([], (10, 10)) == ""
    for label in ["a ; b", "x<loc0001>", " padded"]:
        with pytest.raises(ValueError, match="would not parse back"):
            format_detections([(label, [0, 0, 1, 1])], (10, 10))


def test_shared_helpers_for_other_answer_formats():
    assert split_objects(" a ;b;  c ") == ["a", "b", "c"] and split_objects("  ") == []
    tokens, rest = leading_tokens(f"{_loc(1, 2, 3, 4)}<seg005><seg127> red circle")
    assert tokens == [("loc", 1), ("loc", 2), ("loc", 3), ("loc", 4), ("seg", 5), ("seg", 127)]
    assert rest == "red circle"
    assert parse_loc_box([0, 0, 1023, 1023], (20, 10)) == [0.0, 0.0, 20.0, 10.0]
    with pytest.raises(ValueError, match="image_size must be"):
        parse_detections("", (0, 10))
    assert prompt_task("  Detect cat ; dog") == "detect" and prompt_task("") == ""
