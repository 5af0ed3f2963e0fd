"""Tests of clip_weights.py (no network): open_clip and transformers layouts, written here by hand (key names, configs,
safetensors bytes), load to the outputs of the model they were written from; a loopback server answering like the
Hugging Face hub (302 + X-Linked-Etag) serves hf-hub: repos and the fallback of an OpenAI name; the cache serves a
second load with the server gone; corrupt downloads and cached files are refused; four processes download at once."""
import copy
import hashlib
import http.server
import json
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

import clip_model
import clip_weights
from clip_model import CLIPError
from conftest import make_tiny_clip, save_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------------------------------------------------
# Writers of the foreign formats, from their specifications (checked against safetensors, open_clip and transformers
# once, in a scratch environment: no test imports them)

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def safetensors_bytes(tensors, metadata=None):
    """8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), then the data."""
    header, chunks, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=ST_DTYPES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def transformers_state_dict(sd):
    """OpenAI's keys -> transformers' CLIPModel keys: in_proj split into q, k, v; projections as Linear weights."""
    renames = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
               "positional_embedding": "text_model.embeddings.position_embedding.weight",
               "ln_final.weight": "text_model.final_layer_norm.weight",
               "ln_final.bias": "text_model.final_layer_norm.bias",
               "visual.class_embedding": "vision_model.embeddings.class_embedding",
               "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
               "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
               "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
               "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
               "visual.ln_post.weight": "vision_model.post_layernorm.weight",
               "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}
    block = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
    out = {"text_model.embeddings.position_ids": torch.arange(77)[None]}  # as older transformers saved it
    for key, value in sd.items():
        m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in ("text_projection", "visual.proj"):
            linear = "text_projection.weight" if key == "text_projection" else "visual_projection.weight"
            out[linear] = value.t().clone()  # (E, D)
        elif key.endswith(("in_proj_weight", "in_proj_bias")):
            m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
            tower = "vision_model" if m[1] else "text_model"
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{tower}.encoder.layers.{m[2]}.self_attn.{name}_proj.{m[3]}"] = part.clone()
        elif m:
            tower = "vision_model" if m[1] else "text_model"
            out[f"{tower}.encoder.layers.{m[2]}.{block[m[3]]}.{m[4]}"] = value
        else:
            out[renames[key]] = value
    return out


def write_layout(folder, model, layout, fmt, quick_gelu):
    """model's fp32 weights in open_clip's or transformers' layout, as .safetensors or .bin, with its config file."""
    os.makedirs(folder, exist_ok=True)
    sd = dict(model.state_dict())
    if layout == "open_clip":
        cfg = {"model_cfg": {"embed_dim": 32, **({"quick_gelu": True} if quick_gelu else {})}, "preprocess_cfg": {}}
        config, files = "open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    else:
        act = "quick_gelu" if quick_gelu else "gelu"
        cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 32,
               "text_config": {"hidden_act": act, "hidden_size": 64}, "vision_config": {"hidden_act": act}}
        config, files = "config.json", ("model.safetensors", "pytorch_model.bin")
        sd = transformers_state_dict(sd)
    with open(os.path.join(folder, config), "w") as f:
        json.dump(cfg, f)
    path = os.path.join(folder, files[0] if fmt == "safetensors" else files[1])
    if fmt == "safetensors":
        with open(path, "wb") as f:
            f.write(safetensors_bytes(sd, {"format": "pt"}))
    else:
        torch.save(sd, path)
    return path


def with_activation(model, quick_gelu):
    model = copy.deepcopy(model)
    for block in [] if quick_gelu else model.modules():
        if isinstance(block, clip_model.ResidualAttentionBlock):
            block.mlp.gelu = nn.GELU()
    return model


def outputs(model):
    res = model.visual.input_resolution
    images = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(clip_model.tokenize(["a photo of a dog.", "", "two cats"]))


def assert_same_outputs(model, reference):
    for ours, theirs in zip(outputs(model), outputs(reference)):
        assert torch.equal(ours, theirs)


def activations(model):
    return {type(b.mlp.gelu).__name__ for b in model.modules() if isinstance(b, clip_model.ResidualAttentionBlock)}


@pytest.fixture(scope="module")
def vit():
    return make_tiny_clip("vit", seed=3)


@pytest.fixture(scope="module")
def rn():
    return make_tiny_clip("rn", seed=4)


# ----------------------------------------------------------------------------------------------------------------------
# Layouts and formats

LAYOUT_CASES = [(layout, fmt, quick) for layout in ("open_clip", "transformers") for fmt in ("safetensors", "bin")
                for quick in (True, False)]


@pytest.mark.parametrize("layout, fmt, quick_gelu", LAYOUT_CASES)
def test_each_layout_loads_to_the_outputs_of_the_model_it_was_written_from(tmp_path, vit, layout, fmt, quick_gelu,
                                                                           capsys):
    path = write_layout(str(tmp_path / "repo"), vit, layout, fmt, quick_gelu)
    reference = with_activation(vit, quick_gelu)
    for name in (str(tmp_path / "repo"), path):  # the folder, or the weights file with its config beside it
        model, _ = clip_model.load(name, device="cpu")
        assert activations(model) == {"QuickGELU" if quick_gelu else "GELU"}
        assert_same_outputs(model, reference)
        assert model.state_dict().keys() == vit.state_dict().keys()
        said = capsys.readouterr().out
        assert f"{'QuickGELU' if quick_gelu else 'GELU'} (" in said and path in said, said  # said, never guessed
    assert not torch.equal(outputs(model)[0], outputs(with_activation(vit, not quick_gelu))[0])  # the choice matters


def test_open_clip_resnet_loads_from_safetensors(tmp_path, rn):
    write_layout(str(tmp_path), rn, "open_clip", "safetensors", quick_gelu=True)
    model, preprocess = clip_model.load(str(tmp_path), device="cpu")
    assert_same_outputs(model, rn)
    assert model.visual.input_resolution == 64


def test_a_bare_openai_state_dict_is_quick_gelu_and_a_gelu_one_loads_with_an_open_clip_config(tmp_path, vit, capsys):
    save_state_dict(vit, tmp_path / "model.pt")
    model, _ = clip_model.load(str(tmp_path / "model.pt"), device="cpu")
    assert activations(model) == {"QuickGELU"} and "OpenAI's activation" in capsys.readouterr().out
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": False}}))  # README's recipe
    model, _ = clip_model.load(str(tmp_path / "model.pt"), device="cpu")
    assert activations(model) == {"GELU"} and "GELU (model_cfg.quick_gelu=False" in capsys.readouterr().out


@pytest.mark.parametrize("act", ["gelu", None])  # two activations; a null one
def test_mixed_activations_in_a_transformers_config_are_refused(tmp_path, vit, act):
    write_layout(str(tmp_path), vit, "transformers", "safetensors", quick_gelu=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = act
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CLIPError, match="one activation"):
        clip_model.load(str(tmp_path), device="cpu")


def test_a_folder_without_weights_says_what_it_expects(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CLIPError, match="open_clip_config.json with open_clip_model.safetensors"):
        clip_model.load(str(tmp_path), device="cpu")


def test_safetensors_reader_reads_every_dtype_and_shape(tmp_path):
    tensors = {"a": torch.randn(3, 5).half(), "b": torch.randn(7).bfloat16(), "c": torch.arange(5),
               "d": torch.zeros(0, 3), "e": torch.tensor(2.5), "f": torch.randn(2, 2, 2)}
    (tmp_path / "x.safetensors").write_bytes(safetensors_bytes(tensors, {"format": "pt"}))
    read = clip_weights.read_safetensors(str(tmp_path / "x.safetensors"))
    assert read.keys() == tensors.keys()
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and read[name].shape == t.shape and torch.equal(read[name], t), name


def damaged_safetensors(damage):
    good = safetensors_bytes({"w": torch.ones(4, 4), "b": torch.zeros(4)})
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])

    def rewrite(**entry):
        h = copy.deepcopy(header)
        h["w"].update(entry)
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + good[8 + n:]
    return {"empty": b"", "7 bytes": good[:7], "header longer than the file": struct.pack("<Q", 10**12) + good[8:],
            "header not JSON": struct.pack("<Q", 4) + b"{{{{" + good[8:], "header a list": struct.pack("<Q", 2) + b"[]",
            "unknown dtype": rewrite(dtype="F8_E4M3"), "offsets past the end": rewrite(data_offsets=[0, 10**9]),
            "size not the shape's": rewrite(shape=[4, 5]), "negative dim": rewrite(shape=[-4, -4]),
            "offsets reversed": rewrite(data_offsets=[64, 0]), "no offsets": rewrite(data_offsets=None),
            "truncated data": good[:-10]}[damage]


@pytest.mark.parametrize("damage", ["empty", "7 bytes", "header longer than the file", "header not JSON",
                                    "header a list", "unknown dtype", "offsets past the end", "size not the shape's",
                                    "negative dim", "offsets reversed", "no offsets", "truncated data"])
def test_damaged_safetensors_raise_one_line_clip_error(tmp_path, damage):
    path = tmp_path / "open_clip_model.safetensors"
    path.write_bytes(damaged_safetensors(damage))
    with pytest.raises(CLIPError) as excinfo:
        clip_weights.read_safetensors(str(path))
    assert "\n" not in str(excinfo.value) and str(path) in str(excinfo.value)


def test_clip_model_alone_runs_a_method_from_a_local_openai_checkpoint(tmp_path, vit):
    """clip_model.py, its vocabulary and a method file copied elsewhere, without clip_weights.py."""
    for name in ("clip_model.py", "bpe_simple_vocab_16e6.txt.gz", "coop.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    save_state_dict(vit, tmp_path / "model.pt")
    code = ("import clip_model, coop, torch\n"
            "clip, _ = clip_model.load('model.pt', 'cpu')\n"
            "print(coop.CoOp(clip, ['cat', 'dog'], n_ctx=4)(torch.zeros(1, 3, 32, 32)).shape)\n"
            "try:\n    clip_model.load('ViT-B/16', 'cpu')\nexcept clip_model.CLIPError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "torch.Size([1, 2])"
    assert "need clip_weights.py" in done.stdout.splitlines()[1]


# ----------------------------------------------------------------------------------------------------------------------
# A loopback server answering like the Hugging Face hub (huggingface_hub 2.4 downloads from it: checked once in a
# scratch environment). /ORG/NAME/resolve/main/FILE answers a weights file with a 302 to
# http://localhost:<port>/storage/<sha256> (another host, as the hub's CDN: a redirect within the hub means a renamed
# repo) carrying X-Linked-Etag (the SHA256) and X-Repo-Commit, and a small file with a 200 whose ETag is its git blob
# id. /openai/<sha256>/<file> stands for OpenAI's URLs.

class Hub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.storage_url = f"http://localhost:{self.server_address[1]}/storage/"  # another host name, as the hub's CDN
        self.repos, self.storage, self.openai, self.requests, self.delay = {}, {}, {}, [], 0.0

    def add(self, repo, filename, data):
        self.repos.setdefault(repo, {})[filename] = data
        if filename.endswith((".safetensors", ".bin")):
            self.storage[hashlib.sha256(data).hexdigest()] = data

    def add_folder(self, repo, folder):
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                self.add(repo, name, f.read())

    def paths(self, prefix=""):
        return [path for path, _ in self.requests if path.startswith(prefix)]


class HubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        hub = self.server
        hub.requests.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/storage/"):
            return self.answer(200, hub.storage.get(self.path.split("/")[-1]), {"ETag": '"storage-etag-of-its-own"'})
        if self.path.startswith("/openai/"):
            return self.answer(200, hub.openai.get(self.path))
        repo, _, filename = self.path.lstrip("/").partition("/resolve/main/")
        if repo == "private/repo":
            return self.answer(401, b"")
        data = hub.repos.get(repo, {}).get(filename)
        if data is None:
            return self.answer(404, None)
        sha256 = hashlib.sha256(data).hexdigest()
        if filename.endswith((".safetensors", ".bin")):
            return self.answer(302, b"", {"Location": hub.storage_url + sha256, "X-Linked-Etag": f'"{sha256}"',
                                          "X-Repo-Commit": COMMIT, "ETag": f'"{sha256}"'})
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return self.answer(200, data, {"ETag": f'"{blob}"', "X-Repo-Commit": COMMIT})

    def answer(self, status, body, headers=()):
        if body is None:
            status, body = 404, b"Entry not found"
        self.send_response(status)
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), 1 << 16):  # in chunks, slowly if asked: downloads overlap in time
            self.wfile.write(body[i:i + (1 << 16)])
            time.sleep(self.server.delay)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


def gone(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there


def repo_folder(repo):
    return os.path.join(os.environ["HF_HOME"], "hub", "models--" + repo.replace("/", "--"))


@pytest.mark.parametrize("layout", ["open_clip", "transformers"])
def test_hf_hub_repo_downloads_verified_into_the_cache_then_loads_from_it_with_the_server_gone(
        tmp_path, hub, vit, layout, monkeypatch, capsys):
    path = write_layout(str(tmp_path / "src"), vit, layout, "safetensors", quick_gelu=False)
    hub.add_folder("org/tiny", str(tmp_path / "src"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    model, _ = clip_model.load("hf-hub:org/tiny", device="cpu")
    assert_same_outputs(model, with_activation(vit, quick_gelu=False))
    weights_file = os.path.basename(path)
    sha256 = hashlib.sha256(open(path, "rb").read()).hexdigest()
    folder = repo_folder("org/tiny")
    link = os.path.join(folder, "snapshots", COMMIT, weights_file)
    assert open(os.path.join(folder, "refs", "main")).read() == COMMIT
    assert os.path.islink(link) and os.path.realpath(link) == os.path.join(folder, "blobs", sha256)
    assert f"hf-hub:org/tiny@{COMMIT}/{weights_file} (SHA256 {sha256[:12]}" in capsys.readouterr().out
    assert hub.paths("/storage/") == [f"/storage/{sha256}"]
    assert {auth for p, auth in hub.requests if "/resolve/" in p} == {"Bearer hf_secret"}
    assert {auth for p, auth in hub.requests if p.startswith("/storage/")} == {None}  # the token stays at the hub
    seen = len(hub.requests)
    gone(monkeypatch)
    for offline in ("", "1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        again, _ = clip_model.load("hf-hub:org/tiny", device="cpu")
        assert_same_outputs(again, model)
    assert len(hub.requests) == seen


def test_hf_hub_takes_safetensors_first_and_the_bin_where_there_is_none(tmp_path, hub, vit):
    write_layout(str(tmp_path / "st"), vit, "open_clip", "safetensors", quick_gelu=True)
    write_layout(str(tmp_path / "st"), vit, "open_clip", "bin", quick_gelu=True)
    hub.add_folder("org/both", str(tmp_path / "st"))
    write_layout(str(tmp_path / "bin"), vit, "transformers", "bin", quick_gelu=True)
    hub.add_folder("org/bin", str(tmp_path / "bin"))
    for repo in ("org/both", "org/bin"):
        assert_same_outputs(clip_model.load(f"hf-hub:{repo}", device="cpu")[0], vit)
    weights = [p.split("/")[-1] for p in hub.paths() if "/resolve/" in p and not p.endswith(".json")]
    assert weights == ["open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"]


def test_hf_hub_errors_are_one_line_and_say_what_to_do(hub, monkeypatch):
    for name, expected in [("hf-hub:org/none", "is org/none a CLIP repo"), ("hf-hub:private/repo", "HF_TOKEN")]:
        with pytest.raises(CLIPError, match=expected) as excinfo:
            clip_model.load(name, device="cpu")
        assert "\n" not in str(excinfo.value)
    gone(monkeypatch)
    with pytest.raises(CLIPError, match="HF_HUB_OFFLINE=1"):
        clip_model.load("hf-hub:org/none", device="cpu")


@pytest.mark.parametrize("openai_url", ["404", "refused"])
def test_openai_name_falls_back_to_the_hub_copy_and_is_quick_gelu(tmp_path, hub, rn, monkeypatch, capsys, openai_url):
    payload = open(write_layout(str(tmp_path / "copy"), rn, "open_clip", "safetensors", quick_gelu=False), "rb").read()
    hub.add_folder(clip_weights.HUB_COPIES["RN50"], str(tmp_path / "copy"))  # its config says GELU: not for a name
    base = hub.url if openai_url == "404" else "http://127.0.0.1:9"
    monkeypatch.setitem(clip_model._MODELS, "RN50", f"{base}/openai/{'ab' * 32}/RN50.pt")
    root = tmp_path / "clip_cache"
    model, _ = clip_model.load("RN50", device="cpu", download_root=str(root))
    assert activations(model) == {"QuickGELU"}
    assert_same_outputs(model, rn)
    err = "".join(capsys.readouterr())
    assert "OpenAI's URL failed" in err and "served by the hub copy hf-hub:timm/resnet50_clip.openai" in err
    assert f"SHA256 {hashlib.sha256(payload).hexdigest()[:12]}" in err
    assert not os.listdir(root)  # nothing half-written where OpenAI's file would go
    seen = len(hub.requests)
    gone(monkeypatch)
    monkeypatch.setitem(clip_model._MODELS, "RN50", "http://127.0.0.1:9/openai/x/RN50.pt")
    again, _ = clip_model.load("RN50", device="cpu", download_root=str(root))  # the HF cache, no network
    assert_same_outputs(again, rn)
    assert len(hub.requests) == seen


def test_openai_name_takes_openai_url_first(tmp_path, hub, rn):
    save_state_dict(rn, tmp_path / "RN50.pt")
    payload = (tmp_path / "RN50.pt").read_bytes()
    url = f"{hub.url}/openai/{hashlib.sha256(payload).hexdigest()}/RN50.pt"
    hub.openai[url.removeprefix(hub.url)] = payload
    clip_model._MODELS["RN50"], original = url, clip_model._MODELS["RN50"]
    try:
        model, _ = clip_model.load("RN50", device="cpu", download_root=str(tmp_path / "cache"))
    finally:
        clip_model._MODELS["RN50"] = original
    assert hub.paths() == [url.removeprefix(hub.url)] and (tmp_path / "cache" / "RN50.pt").read_bytes() == payload


def test_a_corrupt_download_is_refused_and_leaves_nothing(tmp_path, hub, vit):
    path = write_layout(str(tmp_path), vit, "open_clip", "safetensors", quick_gelu=True)
    hub.add_folder("org/tiny", str(tmp_path))
    sha256 = hashlib.sha256(open(path, "rb").read()).hexdigest()
    good = hub.storage[sha256]
    hub.storage[sha256] = good[:-1] + bytes([good[-1] ^ 1])  # the storage serves other bytes
    with pytest.raises(CLIPError, match="incomplete or corrupt") as excinfo:
        clip_model.load("hf-hub:org/tiny", device="cpu")
    assert "\n" not in str(excinfo.value)
    folder = repo_folder("org/tiny")
    assert os.listdir(os.path.join(folder, "blobs")) == [hashlib.sha1(b"blob %d\0" % len(c) + c).hexdigest()
                                                        for c in [hub.repos["org/tiny"]["open_clip_config.json"]]]
    assert os.listdir(os.path.join(folder, "snapshots", COMMIT)) == ["open_clip_config.json"]  # no weights link


def test_a_corrupt_cached_file_is_said_to_be_wrong(tmp_path, hub, vit, monkeypatch, capsys):
    path = write_layout(str(tmp_path), vit, "open_clip", "safetensors", quick_gelu=True)
    hub.add_folder("org/tiny", str(tmp_path))
    clip_model.load("hf-hub:org/tiny", device="cpu")
    blob = os.path.join(repo_folder("org/tiny"), "blobs", hashlib.sha256(open(path, "rb").read()).hexdigest())
    good = open(blob, "rb").read()
    with open(blob, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CLIPError, match="is corrupt") as excinfo:
        clip_model.load("hf-hub:org/tiny", device="cpu")
    assert blob in str(excinfo.value) and "\n" not in str(excinfo.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    capsys.readouterr()
    assert_same_outputs(clip_model.load("hf-hub:org/tiny", device="cpu")[0], vit)
    assert "is corrupt" in capsys.readouterr().err and open(blob, "rb").read() == good


def download_in_a_process(kind, url, root, queue):
    try:
        if kind == "hub":
            queue.put(clip_weights.hub_file("org/tiny", ["open_clip_model.safetensors"]))
        else:
            queue.put(clip_weights.download(url, root))
    except BaseException as e:  # noqa: B036 -- reported to the test
        queue.put(f"failed: {e!r}")


@pytest.mark.parametrize("kind", ["hub", "openai"])
def test_four_processes_downloading_at_once_all_end_with_the_verified_file(tmp_path, hub, vit, kind):
    path = write_layout(str(tmp_path / "src"), vit, "open_clip", "safetensors", quick_gelu=True)
    payload = open(path, "rb").read()
    sha256 = hashlib.sha256(payload).hexdigest()
    hub.add_folder("org/tiny", str(tmp_path / "src"))
    hub.openai[f"/openai/{sha256}/tiny.pt"] = payload
    hub.delay = 0.01  # ~200 chunks: a download takes seconds, so the four overlap
    context, queue = multiprocessing.get_context("fork"), multiprocessing.get_context("fork").Queue()
    root = str(tmp_path / "clip")
    workers = [context.Process(target=download_in_a_process, args=(kind, f"{hub.url}/openai/{sha256}/tiny.pt",
                                                                   root, queue)) for _ in range(4)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join()
    assert len(set(results)) == 1 and not results[0].startswith("failed"), results
    assert open(results[0], "rb").read() == payload
    downloads = hub.paths("/storage/" if kind == "hub" else "/openai/")
    assert len(downloads) == 1  # one process downloaded, the others waited for the lock and found the file
    folder = os.path.dirname(os.path.realpath(results[0]))
    assert os.listdir(folder) == [os.path.basename(os.path.realpath(results[0]))]  # no temporary file left


def test_offline_openai_name_says_what_is_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(clip_model._MODELS, "RN50", f"http://127.0.0.1:9/openai/{'ab' * 32}/RN50.pt")
    for state in ("missing", "corrupt"):
        if state == "corrupt":
            (tmp_path / "RN50.pt").write_bytes(b"not the weights")
        with pytest.raises(CLIPError, match=f"HF_HUB_OFFLINE is set, {re.escape(str(tmp_path))}/RN50.pt is "
                                            f"{'not there' if state == 'missing' else 'corrupt'}") as excinfo:
            clip_model.load("RN50", device="cpu", download_root=str(tmp_path))
        assert "\n" not in str(excinfo.value)
    assert (tmp_path / "RN50.pt").read_bytes() == b"not the weights"  # said to be wrong, left for the user


# ----------------------------------------------------------------------------------------------------------------------
# train.py: --backbone takes every source; a results row records the weights' source and SHA256 beside the backbone

def test_a_run_on_an_open_clip_folder_records_the_weights_source_and_sha256(folder, tmp_path, vit, capsys):
    import train
    from conftest import read_rows, train_argv
    path = write_layout(str(tmp_path / "gelu-clip"), vit, "open_clip", "safetensors", quick_gelu=False)
    rows = train.run(train.parse_args(train_argv("zeroshot", folder, str(tmp_path / "gelu-clip"), tmp_path / "out")))
    assert read_rows(tmp_path / "out") == rows and len(rows) == 1
    row = rows[0]
    assert row["backbone"] == str(tmp_path / "gelu-clip") and row["weights"] == path
    assert row["weights_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    out = capsys.readouterr().out
    assert "GELU (model_cfg.quick_gelu=False" in out
    if not torch.cuda.is_available():  # the header says what runs
        assert "precision fp32 (--precision amp: autocast runs on CUDA only)" in out


def test_workers_default_is_at_most_the_cpus():
    import train
    args = train.parse_args(["--method", "zeroshot", "--dataset", "dtd"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert args.workers == min(4, cpus)


def test_backbone_accepts_hf_hub_names_and_folders(tmp_path):
    import runs
    import train
    for backbone in ("hf-hub:org/name", str(tmp_path)):
        args = train.parse_args(["--method", "zeroshot", "--dataset", "dtd", "--backbone", backbone])
        runs.resolve(args)
        assert args.backbone == backbone
    assert os.sep + "hf-hub_org_name" + os.sep in runs.run_dir(args, {**runs.settings_of(args),
                                                                      "backbone": "hf-hub:org/name"})


def test_hf_hub_cache_comes_before_hf_home(tmp_path, hub, vit, monkeypatch):
    write_layout(str(tmp_path / "src"), vit, "transformers", "safetensors", quick_gelu=True)
    hub.add_folder("org/tiny", str(tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    clip_model.load("hf-hub:org/tiny", device="cpu")
    assert os.path.isdir(tmp_path / "hub_cache" / "models--org--tiny" / "snapshots" / COMMIT)
    assert not os.path.exists(os.path.join(os.environ["HF_HOME"], "hub"))
