"""UPT App. A: intra-class visual variance (Eq. 6-7) and inter-class text variance (Eq. 8)."""
import torch

import clip_model

import variance


def test_variances_match_the_equations_on_known_points():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 2.0]])  # class 0: spread 1 each side; class 1: none
    labels = torch.tensor([0, 0, 1, 1])
    assert variance.intra_class_visual_variance(features, labels) == 0.5  # (1 + 0) / 2
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])  # mean 0: (1 + 1 + 9 + 9) / 4
    assert variance.inter_class_text_variance(text) == 5.0


def test_variance_script_on_a_folder_dataset(tmp_path, vit_checkpoint):
    from PIL import Image
    for cls, value in [("dark", 20), ("light", 230)]:
        (tmp_path / "test" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (value + i, value, value)).save(tmp_path / "test" / cls / f"{i}.png")
            Image.new("RGB", (32, 32), (value, value + i, value)).save(tmp_path / "train" / cls / f"{i}.png")
    var_v, var_t = variance.main(["--dataset", f"folder:{tmp_path}", "--backbone", vit_checkpoint, "--workers", "0",
                                  "--output-dir", str(tmp_path / "out")])
    clip, preprocess = clip_model.load(vit_checkpoint, "cpu")  # the same quantities computed by hand
    paths = [tmp_path / "test" / cls / f"{i}.png" for cls in ("dark", "light") for i in range(3)]
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        f = torch.nn.functional.normalize(clip.encode_image(images), dim=-1)
        w = torch.nn.functional.normalize(clip.encode_text(clip_model.tokenize(["a photo of a dark.",
                                                                                 "a photo of a light."])), dim=-1)
    by_hand_v = (((f[:3] - f[:3].mean(0)) ** 2).sum(-1).mean() + ((f[3:] - f[3:].mean(0)) ** 2).sum(-1).mean()) / 2
    assert abs(var_v - by_hand_v.item()) < 1e-5 and abs(var_t - ((w[0] - w[1]) ** 2).sum().item() / 4) < 1e-5
