"""bench.py (a script run by hand): the official layouts of --random-init, one-line errors, and a tiny smoke run."""
import pytest
import torch

import bench
import clip_model
from conftest import make_tiny_clip, save_state_dict

# sum(p.numel() for p in model.parameters()) of OpenAI's released models (e.g. the "Model parameters:" line of CLIP's
# Interacting_with_CLIP notebook for ViT-B/32)
RELEASED_PARAMETERS = {"RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
                       "RN50x64": 623_258_305, "ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737,
                       "ViT-L/14": 427_616_513, "ViT-L/14@336px": 427_944_193}


def test_every_openai_model_has_a_layout():
    assert list(bench.ARCHITECTURES) == clip_model.available_models() == list(RELEASED_PARAMETERS)


@pytest.mark.parametrize("name", RELEASED_PARAMETERS)
def test_layout_builds_the_released_parameter_count(name):
    with torch.device("meta"):  # shapes only: instant
        clip = clip_model.CLIP(*bench.ARCHITECTURES[name])
    assert sum(p.numel() for p in clip.parameters()) == RELEASED_PARAMETERS[name]
    assert clip.visual.input_resolution == bench.ARCHITECTURES[name][1]


@pytest.mark.parametrize("argv, says", [
    (["--methods", "coop,cop"], "did you mean 'coop'"),
    (["--methods", "zeroshot"], "no SGD steps"),
    (["--random-init", "--backbone", "ViT-H/14"], ", ".join(clip_model.available_models())),
    (["--backbone", "no/such/file.pt"], "or the path of a checkpoint file"),
    (["--steps", "0"], "--steps"),
    (["--classes", "0"], "--classes"),
    (["--classes", "100,-5"], "--classes"),
    (["--classes", "ten"], "--classes"),
    (["--batch-size", "0"], "--batch-size"),
    (["--precision", "amp,fp16"], "'fp16'"),
    (["--loader-only", "--no-loader"], "not allowed"),
    (["--text-side", "coop16,coop3"], "unknown --text-side arm 'coop3'"),
    (["--coop-run"], "--coop-run is part of --text-side"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, says, capsys):
    assert bench.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("bench.py: error: ") and says in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "tiny-vit.pt")
    save_state_dict(make_tiny_clip("vit"), path)
    return path


def test_smoke_run_prints_a_row_per_method_and_the_loader_table(tiny_checkpoint, capsys):
    methods = ["coop", "cocoop", "vpt_shallow", "vpt_deep", "upt", "linear_ft"]
    assert bench.main(["--backbone", tiny_checkpoint, "--methods", ",".join(methods), "--classes", "3,4",
                       "--precision", "amp,fp32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--loader-workers", "0", "--loader-images", "4"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "| workers | img/s |" in out and "\n| 0 | " in out
    assert "| method | K | precision | batch | ms/step | img/s | peak mem |" in out
    rows = [line[2:-2].split(" | ") for line in out.splitlines() if line[2:].split(" | ")[0] in methods]
    precisions = 2 if torch.cuda.is_available() else 1  # on CPU amp runs in fp32: its rows appear once
    assert len(rows) == len(methods) * 2 * precisions
    for cells in rows:
        assert cells[3] == "2" and float(cells[4]) > 0 and float(cells[5]) > 0
    assert [c[0] for c in rows[:len(methods)]] == methods and {c[1] for c in rows} == {"3", "4"}


def test_resnet_rows_say_why_visual_prompts_are_not_run(tmp_path, capsys):
    path = str(tmp_path / "tiny-rn.pt")
    save_state_dict(make_tiny_clip("rn"), path)
    assert bench.main(["--backbone", path, "--methods", "coop,vpt_deep", "--classes", "3", "--batch-size", "2",
                       "--steps", "1", "--warmup", "0", "--no-loader"]) == 0
    out = capsys.readouterr().out
    assert "| coop | 3 |" in out and "| vpt_deep | 3 | fp32 | 2 | not run: VPT prompts the image encoder" in out
    assert "| workers |" not in out


def test_sweep_times_the_grid_with_and_without_the_feature_bank(tiny_checkpoint, capsys):
    assert bench.main(["--backbone", tiny_checkpoint, "--sweep", "--sweep-epochs", "1", "--classes", "2",
                       "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert "Rethinking Fig. 1 grid: 6 runs" in out and "| feature bank |" in out and "1.00x |" in out
    assert "| images every step |" in out and out.count("reused") == 6  # bank runs, each reading the bank


def test_eval_prompts_times_upt_evaluation_both_ways(tiny_checkpoint, capsys):
    assert bench.main(["--backbone", tiny_checkpoint, "--eval-prompts", "150", "--classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "UPT evaluation, 150 images, K=3" in out and "| once per batch |" in out and "| once per evaluation |" in out


def test_text_side_prints_plain_and_prefix_side_by_side(tiny_checkpoint, capsys):
    arms = ["coop16", "coop4", "cocoop1", "cocoop4", "upt"]
    assert bench.main(["--backbone", tiny_checkpoint, "--text-side", ",".join(arms), "--classes", "3",
                       "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "| arm | K | plain ms | prefix ms | speed-up |" in out
    rows = [line[2:-2].split(" | ") for line in out.splitlines() if line[2:].split(" | ")[0] in arms]
    assert [cells[0] for cells in rows] == arms and {cells[1] for cells in rows} == {"3"}
    for cells in rows:
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[4].endswith("x")
        assert float(cells[8]) < 1e-4  # the two paths' gradients agree up to float rounding
