"""`ssm2d predict`: top-k class names of image files, with the checkpoint's transform and names."""

from __future__ import annotations

import json

import pytest
import torch
from deploy_files import CLASSES, COLOURS, trained_checkpoint, write_png  # noqa: F401  (a fixture)
from PIL import Image

from ssm2d.cli import main
from ssm2d.data import build_transform, dataset_info
from ssm2d.deploy import checkpoint_transform, find_images, predict_images
from ssm2d.train import load_checkpoint, load_trained_model, save_checkpoint


@pytest.fixture()
def images(tmp_path):
    """Two PNGs at the training size, one larger and non-square, and a text file, in a folder tree."""
    folder = tmp_path / "images"
    write_png(folder / "red.png", COLOURS["red"], (28, 28), seed=1)
    write_png(folder / "nested" / "green.PNG", COLOURS["green"], (28, 28), seed=2)
    write_png(folder / "nested" / "blue_wide.png", COLOURS["blue"], (50, 35), seed=3)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_text_and_json(trained_checkpoint, images, capsys):
    main(["predict", "--checkpoint", str(trained_checkpoint), str(images), "--topk", "2"])
    text = capsys.readouterr().out.splitlines()
    files = [str(images / "nested" / "blue_wide.png"), str(images / "nested" / "green.PNG"), str(images / "red.png")]
    assert [line for line in text if not line.startswith(" ")] == files  # sorted walk; notes.txt skipped
    assert len(text) == 3 * 3
    rows = [line.split() for line in text if line.startswith(" ")]
    assert all(len(row) == 2 and row[1] in CLASSES and 0 < float(row[0]) <= 1 for row in rows)

    main(["predict", "--checkpoint", str(trained_checkpoint), str(images / "red.png"), str(images / "nested"),
          "--json"])  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == [files[2], files[0], files[1]]
    for r in results:
        predictions = r["predictions"]
        assert len(predictions) == 3  # --topk 5, but only three classes
        assert sorted(p["class"] for p in predictions) == sorted(CLASSES)
        assert all(CLASSES[p["index"]] == p["class"] for p in predictions)
        probs = [p["probability"] for p in predictions]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert [f"{p:.4f}" for p in probs[:2]] == [row[0] for row in rows[2 * files.index(r["image"]) :][:2]]


def test_predict_matches_the_model_on_the_training_transform(trained_checkpoint, images):
    """An image at the training size goes through the training run's own eval transform."""
    state = load_checkpoint(trained_checkpoint)
    info = dataset_info("imagefolder", state["config"]["data_dir"], img_size=28)
    model, _ = load_trained_model(trained_checkpoint)
    with Image.open(images / "red.png") as img:
        img = img.convert("RGB")
        expected_input = build_transform(info, False, 28)(img)
        assert torch.equal(checkpoint_transform(state)(img), expected_input)
    with torch.no_grad():
        probs = torch.softmax(model(expected_input[None]), -1)[0]
    (result,) = predict_images(trained_checkpoint, [images / "red.png"], topk=1)
    assert result["predictions"][0]["index"] == int(probs.argmax())
    assert abs(result["predictions"][0]["probability"] - float(probs.max())) < 1e-6


def test_old_checkpoint_without_names_gives_indices(trained_checkpoint, images, tmp_path):
    state = load_checkpoint(trained_checkpoint)
    del state["classes"]
    old = save_checkpoint(state, tmp_path / "old.pt")
    (result,) = predict_images(old, [images / "red.png"], topk=3)
    assert sorted(p["class"] for p in result["predictions"]) == ["0", "1", "2"]


def test_predict_errors(trained_checkpoint, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", str(trained_checkpoint), str(images / "red.png"), str(broken)])
    message = str(exit_info.value)
    assert message.startswith(f"ssm2d predict: error: {broken}: cannot be read as an image") and "\n" not in message
    with pytest.raises(SystemExit, match="images: .*missing.png does not exist"):
        main(["predict", "--checkpoint", str(trained_checkpoint), str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        find_images([tmp_path / "empty"])
