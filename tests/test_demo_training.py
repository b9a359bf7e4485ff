"""The demo model's training pipeline end to end, a few steps: tower pretraining -> PaliGemma training."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from paligemma.demo import pretrain_vision, train
from paligemma.demo.recipe import demo_vision_config
from paligemma.loading import load_model


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    out = tmp_path_factory.mktemp("tower")
    torch.set_num_threads(1)
    scores = pretrain_vision.pretrain(out, steps=2, batch_size=4, eval_every=2, eval_scenes=24, log=lambda line: None)
    return out, scores


def test_pretraining_writes_the_tower_and_scores_it(tower):
    out, scores = tower
    state = load_file(str(out / "vision_tower.safetensors"))
    assert all(name.startswith("vision_tower.") for name in state)
    assert state["vision_tower.embeddings.patch_embedding.weight"].shape[-1] == demo_vision_config().patch_size
    assert 0 <= scores["zero_shot_accuracy"] <= 1 and scores["retrieval_scenes"] == 24
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "image_to_text_r1" in rows[-1]


def test_training_from_the_pretrained_tower_with_segmentation(tower, tmp_path):
    tower_dir, _ = tower
    run = tmp_path / "run"
    assert train.main(["--out", str(run), "--steps", "2", "--batch-size", "2", "--segment", "--eval-every", "2",
                       "--save-every", "2", "--vision-init", str(tower_dir / "vision_tower.safetensors")]) == 0
    # The untrained checkpoint starts from the pretrained tower, exactly.
    init = load_model(run / "init")
    pretrained = load_file(str(tower_dir / "vision_tower.safetensors"))
    for name, tensor in init.state_dict().items():
        if name.startswith("vision_tower."):
            torch.testing.assert_close(tensor, pretrained[name], rtol=0, atol=0)
    # The checkpoints carry the mask codec, so `segment` answers can be decoded; the init folder is left alone.
    assert (run / "final" / "mask_codec.safetensors").is_file()
    assert (run / "checkpoint-2" / "mask_codec.safetensors").is_file()
    assert not (run / "init" / "mask_codec.safetensors").exists()
    assert (run / "final" / "tokenizer.model").is_file()


def test_a_tower_of_another_shape_is_refused(tower, tmp_path):
    tower_dir, _ = tower
    state = load_file(str(tower_dir / "vision_tower.safetensors"))
    del state["vision_tower.post_layernorm.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match="does not match the demo's vision tower"):
        train.main(["--out", str(tmp_path / "run"), "--steps", "1", "--vision-init", str(bad)])
