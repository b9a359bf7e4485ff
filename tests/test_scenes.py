"""The shapes world: determinism, geometry, and the exact answer formats of the demo tasks."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma.demo import scenes
from paligemma.demo.scenes import (
    CAPTION_PROMPT,
    COLORS,
    SHAPES,
    caption,
    color_prompt,
    corpus_lines,
    count_prompt,
    detect_answer,
    detect_prompt,
    generate_scene,
    iou,
    mask_iou,
    sample_example,
    sample_task,
    scene_examples,
    segment_answer,
    segment_prompt,
    write_dataset_jsonl,
)
from paligemma.tasks import encode_box, parse_detections, split_objects

N_SEEDS = 200
DETECT_RE = re.compile(r"^(<loc\d{4}>){4} (circle|square|triangle)$")


@pytest.fixture(scope="module")
def many_scenes():
    return [generate_scene(seed) for seed in range(N_SEEDS)]


def test_same_seed_same_pixels_different_seeds_differ():
    a, b = generate_scene(7), generate_scene(7)
    assert a.image.tobytes() == b.image.tobytes()
    assert [(o.shape, o.color, o.box) for o in a.objects] == [(o.shape, o.color, o.box) for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert generate_scene(8).image.tobytes() != a.image.tobytes()
    assert sample_example(7)[1:] == sample_example(7)[1:]


def test_image_size_and_mode():
    for size in (224, 96):
        scene = generate_scene(3, size=size)
        assert scene.image.mode == "RGB" and scene.image.size == (size, size)
        assert scene.size == size
        assert all(o.mask.shape == (size, size) for o in scene.objects)


def test_object_counts_shapes_and_colours_cover_the_world(many_scenes):
    counts = Counter(len(s.objects) for s in many_scenes)
    assert set(counts) == {1, 2, 3, 4}
    assert {o.shape for s in many_scenes for o in s.objects} == set(SHAPES)
    assert {o.color for s in many_scenes for o in s.objects} == set(COLORS)
    # Repeats are allowed (counting needs them).
    assert any(max(Counter(o.shape for o in s.objects).values()) >= 2 for s in many_scenes)


def test_boxes_inside_image_minimum_size_no_overlap(many_scenes):
    for scene in many_scenes:
        size = scene.size
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert max(x1 - x0, y1 - y0) >= 0.12 * size
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert iou(a.box, b.box) == 0.0
                assert not (a.mask & b.mask).any()


def test_masks_match_boxes_and_colours(many_scenes):
    for scene in many_scenes[:50]:
        pixels = np.asarray(scene.image).astype(float)
        background = np.ones(pixels.shape[:2], dtype=bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            ys, xs = np.nonzero(o.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            # The mask's pixels carry the object's colour (up to jitter and noise).
            mean = pixels[o.mask].mean(axis=0)
            assert np.abs(mean - COLORS[o.color]).max() < scenes.COLOR_JITTER + 3
            background &= ~o.mask
        # Background is light grey: far from every palette colour.
        bg = pixels[background].mean(axis=0)
        assert bg.min() > 180 and bg.max() - bg.min() < 20


def test_canonical_order_and_caption(many_scenes):
    for scene in many_scenes:
        centres = [o.center for o in scene.objects]
        assert centres == sorted(centres)
        text = caption(scene)
        phrases = re.split(r", | and ", text)
        expected = [f"{'an' if o.color == 'orange' else 'a'} {o.color} {o.shape}" for o in scene.objects]
        assert phrases == expected
        assert text.count(" and ") == (1 if len(scene.objects) > 1 else 0)


def test_caption_grammar():
    scene = next(s for s in map(generate_scene, range(100)) if len(s.objects) == 3)
    p = [f"{'an' if o.color == 'orange' else 'a'} {o.color} {o.shape}" for o in scene.objects]
    assert caption(scene) == f"{p[0]}, {p[1]} and {p[2]}"


def test_loc_values_follow_big_vision_rounding():
    assert encode_box((0, 0, 224, 224), (224, 224)) == "<loc0000><loc0000><loc1023><loc1023>"
    # 511.5 -> 512 (half to even)
    assert encode_box((112, 100, 112, 100), (224, 224)) == "<loc0457><loc0512><loc0457><loc0512>"
    assert encode_box((10, 20, 30, 40), (224, 224)) == "<loc0091><loc0046><loc0183><loc0137>"  # y0 x0 y1 x1


def test_detect_format_order_and_absent(many_scenes):
    for scene in many_scenes:
        for shape in SHAPES:
            answer = detect_answer(scene, shape)
            matches = [o for o in scene.objects if o.shape == shape]
            if not matches:
                assert answer == ""
                continue
            parts = answer.split(" ; ")
            assert len(parts) == len(matches)
            for part, o in zip(parts, matches):
                assert DETECT_RE.match(part), part
                values = [int(v) for v in re.findall(r"<loc(\d{4})>", part)]
                x0, y0, x1, y1 = o.box
                assert values == [round(v / scene.size * 1023) for v in (y0, x0, y1, x1)]
                assert part.endswith(" " + shape)


def test_scene_examples_counts_and_colours(many_scenes):
    for scene in many_scenes:
        examples = dict(scene_examples(scene))
        assert examples[CAPTION_PROMPT] == caption(scene)
        for shape in SHAPES:
            n = sum(o.shape == shape for o in scene.objects)
            assert examples[detect_prompt(shape)] == detect_answer(scene, shape)
            assert examples[count_prompt(shape)] == str(n)
            if n == 1:
                assert examples[color_prompt(shape)] == next(o.color for o in scene.objects if o.shape == shape)
            else:
                assert color_prompt(shape) not in examples
    assert count_prompt("circle") == "answer en how many circles are there?"
    assert color_prompt("square") == "answer en what color is the square?"


def test_sampled_examples_follow_the_mix(many_scenes):
    tasks = Counter()
    for seed, scene in enumerate(many_scenes):
        task, prefix, suffix = sample_task(scene, np.random.default_rng(seed))
        assert (prefix, suffix) in scene_examples(scene)
        tasks[task] += 1
    for task, share in scenes.TASK_MIX.items():
        assert tasks[task] > 0.4 * share * N_SEEDS
    image, prefix, suffix = sample_example(5)
    assert image.tobytes() == generate_scene(5).image.tobytes()
    assert (prefix, suffix) in scene_examples(generate_scene(5))


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_corpus_covers_every_answer_word(many_scenes):
    lines = list(corpus_lines())
    words = {w for line in lines for w in line.split()}
    loc = re.compile(r"<loc\d{4}>")
    for scene in many_scenes[:50]:
        for prefix, suffix in scene_examples(scene):
            for w in f"{prefix} {loc.sub(' ', suffix)}".replace(",", " ").split():
                assert w in words, w
    assert not any(loc.search(line) for line in lines)


def test_write_dataset_jsonl_round_trip(tmp_path):
    path = write_dataset_jsonl(tmp_path / "a", n=5, seed0=10)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 5
    for seed, row in zip(range(10, 15), rows):
        image, prefix, suffix = sample_example(seed)
        assert row == {"image": f"images/{seed:08d}.png", "prefix": prefix, "suffix": suffix}
        with Image.open(tmp_path / "a" / row["image"]) as saved:
            assert saved.tobytes() == image.tobytes()
    again = write_dataset_jsonl(tmp_path / "b", n=5, seed0=10)
    assert again.read_bytes() == path.read_bytes()
    assert (tmp_path / "b/images/00000012.png").read_bytes() == (tmp_path / "a/images/00000012.png").read_bytes()


def test_detect_answers_agree_with_the_library_encoder_and_parser(many_scenes):
    for scene in many_scenes[:50]:
        size = scene.size
        for shape in SHAPES:
            result = parse_detections(detect_answer(scene, shape), (size, size))
            assert not result.errors
            truth = [o.box for o in scene.objects if o.shape == shape]
            assert [d.label for d in result.objects] == [shape] * len(truth)
            for d, box in zip(result.objects, truth):
                assert np.allclose(d.box, box, atol=0.5)  # bins are 224/1023 px wide


# ---------------------------------------------------------------------- the default data is pinned

def test_default_sampling_is_unchanged():
    """A training run depends on these exact examples: segment support must not move a single one."""
    assert sample_example(0)[1:] == ("detect triangle", "<loc0539><loc0192><loc0891><loc0543> triangle ; "
                                     "<loc0119><loc0680><loc0352><loc0913> triangle")
    assert sample_example(3)[1:] == ("caption en", "a purple circle, a green square and an orange triangle")
    assert sample_example(4)[1:] == ("detect triangle", "<loc0343><loc0653><loc0539><loc0849> triangle")
    assert sample_example(10)[1:] == ("answer en how many circles are there?", "0")
    digest = hashlib.sha256()
    for seed in range(300):
        digest.update(json.dumps(sample_example(seed)[1:]).encode())
    assert digest.hexdigest() == "b2b334633b1c1eaa74bd996599556f85099b3fa3b0a7bc1acf1bd920fe2a3663"
    assert scenes.TASK_MIX == {"caption": 0.25, "detect": 0.40, "count": 0.20, "color": 0.15}
    assert all(not prefix.startswith("segment") for prefix, _ in scene_examples(generate_scene(3)))


# ---------------------------------------------------------------------- segment answers

SEGMENT_RE = re.compile(r"^((?:<loc\d{4}>){4})((?:<seg\d{3}>){16}) (circle|square|triangle)$")
SHIPPED_CODEC = Path(scenes.__file__).parent.parent / "demo_model" / "mask_codec.safetensors"


@pytest.fixture(scope="module")
def random_codec():
    """An untrained codec: its codes are arbitrary but deterministic, which is all the format needs."""
    import torch

    from paligemma.vqvae import MaskCodec, MaskCodecConfig

    torch.manual_seed(0)
    return MaskCodec(MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8, encoder_channels=(4, 4, 8, 8))).eval()


@pytest.fixture(scope="module")
def shipped_codec():
    """The demo model's codec: package data, so a missing file is a failure, not a skip."""
    from paligemma.vqvae import load_mask_codec

    return load_mask_codec(SHIPPED_CODEC)


def test_segment_answer_format(many_scenes, random_codec):
    import torch

    from paligemma.segmentation import mask_to_64

    assert segment_prompt("circle") == "segment circle"
    for scene in many_scenes[:40]:
        for shape in SHAPES:
            answer = segment_answer(scene, shape, random_codec)
            matches = [o for o in scene.objects if o.shape == shape]
            if not matches:
                assert answer == ""
                continue
            parts = answer.split(" ; ")
            assert len(parts) == len(matches)
            with torch.no_grad():
                codes = random_codec.encode(np.stack([mask_to_64(o.mask, o.box) for o in matches])).tolist()
            for part, detected, object_codes in zip(parts, detect_answer(scene, shape).split(" ; "), codes):
                locs, segs, label = SEGMENT_RE.match(part).groups()
                assert label == shape and detected == f"{locs} {shape}"  # the box exactly as in detect
                assert [int(v) for v in re.findall(r"<seg(\d{3})>", segs)] == object_codes


def test_segment_answers_decode_back_to_the_objects_masks(many_scenes, shipped_codec):
    from paligemma.segmentation import parse_segmentations

    ious = []
    for scene in many_scenes[:40]:
        for shape in SHAPES:
            truth = [o for o in scene.objects if o.shape == shape]
            result = parse_segmentations(segment_answer(scene, shape, shipped_codec), (scene.size,) * 2, shipped_codec)
            assert result.errors == [] and [o.label for o in result.objects] == [shape] * len(truth)
            for parsed, obj in zip(result.objects, truth):
                assert np.allclose(parsed.box, obj.box, atol=0.5)
                ious.append(mask_iou(parsed.mask, obj.mask))
    # The box goes through the 1024 location bins and is truncated to whole pixels (big_vision's
    # convention), which costs a pixel row or column now and then: ~0.95 on average.
    assert min(ious) > 0.8 and np.mean(ious) > 0.92, (min(ious), np.mean(ious))


def test_segment_examples_only_with_a_codec(random_codec):
    prefixes = [sample_example(seed)[1] for seed in range(200)]
    assert not any(p.startswith("segment") for p in prefixes)
    tasks = Counter()
    for seed in range(200):
        scene = generate_scene(seed)
        task, prefix, suffix = sample_task(scene, np.random.default_rng(seed), random_codec)  # SEGMENT_TASK_MIX
        assert (prefix, suffix) in scene_examples(scene, random_codec)
        tasks[task] += 1
    assert set(tasks) == set(scenes.SEGMENT_TASK_MIX) and tasks["segment"] > 0.4 * 0.25 * 200
    assert sum(scenes.SEGMENT_TASK_MIX.values()) == pytest.approx(1.0)
    # With a codec but the original mix: the original examples.
    assert [sample_example(seed, codec=random_codec, mix=scenes.TASK_MIX)[1:] for seed in range(20)] == \
        [sample_example(seed)[1:] for seed in range(20)]
    image, prefix, suffix = sample_example(7, codec=random_codec, mix={"segment": 1.0})
    assert prefix.startswith("segment ") and image.tobytes() == generate_scene(7).image.tobytes()
    assert suffix == segment_answer(generate_scene(7), prefix.split()[1], random_codec)
    with pytest.raises(ValueError, match="mask codec"):
        sample_example(7, mix=scenes.SEGMENT_TASK_MIX)
    with pytest.raises(ValueError, match="task mix"):
        sample_example(7, mix={"ocr": 1.0})


def test_mask_iou():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert mask_iou(a, b) == 0.0
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, a) == 1.0 and mask_iou(a, b) == pytest.approx(4 / 12)
    with pytest.raises(ValueError, match="shapes"):
        mask_iou(a, np.zeros((4, 5), bool))


# ---------------------------------------------------------------------- multi-class prompts

def truth_of(scene, labels):
    return [o for o in scene.objects if o.shape in labels]


def test_multiclass_prompts_and_answers(many_scenes, random_codec):
    """`detect A ; B`: objects of every asked shape, in the scene's canonical order whatever the order
    of the labels, each with its own label; an absent shape adds nothing."""
    assert detect_prompt(["triangle", "circle"]) == "detect triangle ; circle"
    assert segment_prompt(("square", "circle")) == "segment square ; circle"
    assert detect_prompt("circle") == "detect circle"
    for bad in (["circle", "hexagon"], []):
        with pytest.raises(ValueError, match="shapes are among"):
            detect_prompt(bad)
    for scene in many_scenes[:60]:
        for labels in scenes.multiclass_label_lists("detect_multi"):
            answer = detect_answer(scene, labels)
            assert answer == detect_answer(scene, labels[::-1])  # the prompt's order does not matter
            result = parse_detections(answer, (scene.size,) * 2)
            truth = truth_of(scene, labels)
            assert not result.errors and [d.label for d in result.objects] == [o.shape for o in truth]
            assert all(np.allclose(d.box, o.box, atol=0.5) for d, o in zip(result.objects, truth))
            single = {part for shape in labels for part in detect_answer(scene, shape).split(" ; ") if part}
            assert set(split_objects(answer)) == single  # the single-class answers' objects, merged
        for labels in scenes.multiclass_label_lists("segment_multi"):
            parts = split_objects(segment_answer(scene, labels, random_codec))
            assert [SEGMENT_RE.match(p).group(3) for p in parts] == [o.shape for o in truth_of(scene, labels)]
    scene = generate_scene(1_000_005_024)  # the README's example: purple circle, red triangle, green circle
    assert [o.shape for o in scene.objects] == ["circle", "triangle", "circle"]
    assert [d.label for d in parse_detections(detect_answer(scene, ["triangle", "circle"]), (224, 224)).objects] \
        == ["circle", "triangle", "circle"]
    assert detect_answer(scene, ["square", "triangle"]) == detect_answer(scene, "triangle")


def test_segment_sampling_is_unchanged(shipped_codec):
    """Stages 2-6 of the demo model trained on these exact examples: adding multi-class prompts must not
    move one (the hash was taken before they existed)."""
    digest = hashlib.sha256()
    for seed in range(100):
        digest.update(json.dumps(sample_example(seed, codec=shipped_codec)[1:]).encode())
    assert digest.hexdigest() == "3ff3ac4df1beed9ffb13cc85c3138ae93be798d35674b6c627d7c3e027432298"


def test_multiclass_mix(random_codec):
    """MULTICLASS_TASK_MIX draws labels in random order, absent shapes included, and labels appear in the
    prompt only; the older mixes are untouched (their pins above)."""
    assert sum(scenes.MULTICLASS_TASK_MIX.values()) == pytest.approx(1.0)
    tasks, label_counts, orders, all_absent = Counter(), Counter(), set(), 0
    for seed in range(400):
        scene = generate_scene(seed)
        task, prefix, suffix = sample_task(scene, np.random.default_rng(seed), random_codec, scenes.MULTICLASS_TASK_MIX)
        tasks[task] += 1
        assert (prefix, suffix) in scene_examples(scene, random_codec, multiclass=True)
        if task not in scenes.MULTICLASS_LABELS:
            continue
        labels = prefix.split(" ", 1)[1].split(" ; ")
        assert prefix.split()[0] == task.split("_")[0] and len(set(labels)) == len(labels)
        label_counts[task, len(labels)] += 1
        orders.add(tuple(labels))
        answered = [part.rsplit(" ", 1)[1] for part in suffix.split(" ; ") if part]
        assert set(answered) <= set(labels)
        assert answered == [o.shape for o in scene.objects if o.shape in labels]
        all_absent += not answered
    assert set(tasks) == set(scenes.MULTICLASS_TASK_MIX)
    assert all(tasks[t] > 0.5 * share * 400 for t, share in scenes.MULTICLASS_TASK_MIX.items())
    assert set(label_counts) == {("detect_multi", 2), ("detect_multi", 3), ("segment_multi", 2)}
    assert len(orders) == 12 and all_absent > 0  # every ordered pair and triple; some ask only for absent shapes
    with pytest.raises(ValueError, match="mask codec"):
        sample_example(7, mix={"segment_multi": 1.0})
    assert [sample_example(seed, codec=random_codec, mix={"detect_multi": 1.0})[1:] for seed in range(5)] == \
        [sample_example(seed, mix={"detect_multi": 1.0})[1:] for seed in range(5)]


def test_side_by_side_shapes():
    """Different shapes whose box centres are less than SIDE_BY_SIDE_FRAC of the width apart in x count;
    the same shape so placed, or shapes further apart, do not."""
    def scene(*objects):
        drawn = [scenes.SceneObject(shape, "red", box, np.zeros((224, 224), bool)) for shape, box in objects]
        return scenes.Scene(Image.new("RGB", (224, 224)), drawn)

    above = ("circle", (150, 20, 200, 70))
    assert scenes.side_by_side_shapes(scene(above, ("triangle", (155, 150, 194, 190))))  # centres 0.5 px apart
    assert not scenes.side_by_side_shapes(scene(above, ("circle", (155, 150, 194, 190))))
    assert not scenes.side_by_side_shapes(scene(above, ("triangle", (100, 150, 130, 190))))  # 60 px apart
    assert not scenes.side_by_side_shapes(scene(above))
    beside = scene(above, ("triangle", (155, 150, 194, 190)), ("square", (10, 10, 40, 40)))
    assert scenes.side_by_side_flags(beside.objects, beside.size) == [True, True, False]


def test_side_by_side_swaps_only_multiclass_scenes(random_codec):
    """`sample_example(side_by_side=1)` gives multi-class examples a scene with side-by-side shapes (when one
    of SIDE_BY_SIDE_TRIES candidates has them) and leaves every other example as it was."""
    mix, swapped, multiclass = scenes.MULTICLASS_TASK_MIX, 0, 0
    for seed in range(150):
        plain = sample_example(seed, codec=random_codec, mix=mix)
        image, prefix, suffix = sample_example(seed, codec=random_codec, mix=mix, side_by_side=1.0)
        if prefix.split(" ; ")[0] == prefix:  # one label: not a multi-class example
            assert (image.tobytes(), prefix, suffix) == (plain[0].tobytes(), *plain[1:])
            continue
        multiclass += 1
        candidates = [generate_scene(scenes.SIDE_BY_SIDE_SEED0 + scenes.SIDE_BY_SIDE_TRIES * seed + k)
                      for k in range(scenes.SIDE_BY_SIDE_TRIES)]
        chosen = next((c for c in candidates if scenes.side_by_side_shapes(c)), generate_scene(seed))
        assert image.tobytes() == chosen.image.tobytes()
        assert (prefix, suffix) in scene_examples(chosen, random_codec, multiclass=True)
        swapped += scenes.side_by_side_shapes(chosen)
    assert multiclass > 20 and swapped > 0.8 * multiclass
    assert [sample_example(seed, codec=random_codec, mix=mix, side_by_side=0.0)[1:] for seed in range(20)] == \
        [sample_example(seed, codec=random_codec, mix=mix)[1:] for seed in range(20)]
