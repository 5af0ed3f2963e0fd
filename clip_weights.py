"""Where CLIP weights come from: OpenAI's names (OpenAI's URL, else the Hugging Face hub copy open_clip uses), hub repos
and local folders in open_clip's or transformers' layout, safetensors read without the package, the Hugging Face cache,
and downloads verified by SHA256 that many processes can share. `find(name)` -> Weights; `read(weights)` -> a state
dict with OpenAI's key names for clip_model.build_model.

Arrows: clip_model.load imports this file only for what clip_model.py cannot do alone (names, hf-hub:, folders,
safetensors, foreign layouts), so clip_model.py copied without it still loads a local OpenAI-format checkpoint; this
file uses clip_model's reader of those files, its error class and nothing else of the model.
"""
import functools
import hashlib
import http.client
import json
import os
import shutil
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows: no locks; unique temporary names still keep every file whole
    fcntl = None

import torch

import clip_model
from clip_model import CLIPError, one_line

# OpenAI's weights as open_clip serves them since OpenAI's URLs answer 404 (openai/CLIP#516): the whole CLIP, OpenAI's
# key names, in open_clip_model.safetensors (or open_clip_pytorch_model.bin) of these repos; model.safetensors there is
# timm's image tower alone.
HUB_COPIES = {"RN50": "timm/resnet50_clip.openai", "RN101": "timm/resnet101_clip.openai",
              "RN50x4": "timm/resnet50x4_clip.openai", "RN50x16": "timm/resnet50x16_clip.openai",
              "RN50x64": "timm/resnet50x64_clip.openai", "ViT-B/32": "timm/vit_base_patch32_clip_224.openai",
              "ViT-B/16": "timm/vit_base_patch16_clip_224.openai", "ViT-L/14": "timm/vit_large_patch14_clip_224.openai",
              "ViT-L/14@336px": "timm/vit_large_patch14_clip_336.openai"}
# (config, weights files in order of preference) of each layout
LAYOUTS = {"open_clip": ("open_clip_config.json", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]),
           "transformers": ("config.json", ["model.safetensors", "pytorch_model.bin"])}


class Weights(NamedTuple):
    path: str         # the file read
    quick_gelu: bool  # the MLP activation: QuickGELU (OpenAI) or exact GELU (most other weights)
    why: str          # where the activation was read, said on every load
    source: str       # an OpenAI URL, hf-hub:ORG/NAME@commit/FILE or an absolute path
    sha256: str       # of the file read


def sha256_of(path):
    """The file's SHA256, hashed again only when the file changes (its size, modification time or inode)."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _sha256(path, *stamp):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Formats: safetensors (read without the package), transformers' CLIPModel keys -> OpenAI's, the activation in configs

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """An 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}
    (offsets into the data after the header), then the data. Untrusted: every field is checked -> {name: tensor}."""
    bad = lambda why: CLIPError(f"{path} is not a valid safetensors file ({why}): delete it and download it again")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise bad(f"{size} bytes")
        n = struct.unpack("<Q", f.read(8))[0]
        if n > size - 8:
            raise bad(f"header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        tensors, data_size = {}, size - 8 - n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
                assert all(type(s) is int and s >= 0 for s in shape) and type(begin) is type(end) is int
            except (KeyError, TypeError, ValueError, AssertionError):
                raise bad(f"{name!r}: {json.dumps(entry)[:80]}, not a known dtype, a shape and [begin, end]") from None
            numel = 1
            for s in shape:
                numel *= s
            if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
                raise bad(f"{name!r}: bytes {begin}..{end} of {data_size} do not hold {entry['dtype']} {shape}")
            f.seek(8 + n + begin)
            chunk = bytearray(f.read(end - begin))  # aligned, writable, owned by the tensor
            tensors[name] = torch.frombuffer(chunk, dtype=dtype).reshape(shape) if numel else \
                torch.empty(shape, dtype=dtype)
    return tensors


def from_transformers(sd):
    """transformers' CLIPModel keys -> OpenAI's: q/k/v_proj are fused into in_proj (q, k, v concatenated), the
    projections are Linear weights (OpenAI's matrices transposed), the rest are renamed one to one."""
    renames = [("text_model.embeddings.token_embedding.", "token_embedding."),
               ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
               ("text_model.encoder.layers.", "transformer.resblocks."), ("text_model.final_layer_norm.", "ln_final."),
               ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
               ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
               ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
               ("vision_model.pre_layrnorm.", "visual.ln_pre."), ("vision_model.post_layernorm.", "visual.ln_post."),
               ("vision_model.encoder.layers.", "visual.transformer.resblocks."), (".self_attn.", ".attn."),
               (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
               (".mlp.fc2.", ".mlp.c_proj.")]
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):  # a buffer of 0..L-1 that older transformers saved
            continue
        if key in ("text_projection.weight", "visual_projection.weight"):
            out["text_projection" if key.startswith("text") else "visual.proj"] = value.t().contiguous()  # (D, E)
            continue
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    for key in [k for k in out if ".attn.q_proj." in k]:
        q, k, v = (out.pop(key.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj"))
        out[key.replace("q_proj.", "in_proj_")] = torch.cat([q, k, v])  # (3D, D) or (3D,)
    return out


def read(weights):
    """Weights -> {OpenAI key: tensor}: safetensors by its own reader, .pt/.bin by clip_model's (TorchScript archive
    or torch.save'd dict), transformers' keys converted."""
    if weights.path.endswith(".safetensors"):
        sd = read_safetensors(weights.path)
    else:
        sd = clip_model.read_state_dict(weights.path)
    return from_transformers(sd) if any(str(k).startswith("text_model.") for k in sd) else sd


def activation(folder):
    """(quick_gelu, why) from the config beside the weights: open_clip's model_cfg.quick_gelu (absent: GELU, as in
    open_clip), transformers' hidden_act per tower (absent: quick_gelu, as in transformers), else OpenAI's QuickGELU."""
    path = os.path.join(folder, "open_clip_config.json")
    if os.path.isfile(path):
        cfg = read_json(path)
        model_cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else None
        quick = model_cfg.get("quick_gelu", False) if isinstance(model_cfg, dict) else False
        return bool(quick), f"{'QuickGELU' if quick else 'GELU'} (model_cfg.quick_gelu={quick} in {path})"
    path = os.path.join(folder, "config.json")
    cfg = read_json(path) if os.path.isfile(path) else None
    if isinstance(cfg, dict) and "text_config" in cfg:
        towers = [cfg.get(t) if isinstance(cfg.get(t), dict) else {} for t in ("text_config", "vision_config")]
        acts = {tower.get("hidden_act", "quick_gelu") for tower in towers}
        if len(acts) > 1 or not acts <= {"quick_gelu", "gelu"}:
            raise CLIPError(f"{path}: hidden_act {sorted(map(str, acts))}: this CLIP runs one activation, quick_gelu "
                            "or gelu")
        quick = acts == {"quick_gelu"}
        return quick, f"{'QuickGELU' if quick else 'GELU'} (hidden_act {acts.pop()} in {path})"
    return True, "QuickGELU (no open_clip_config.json or CLIP config.json beside the file: OpenAI's activation)"


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CLIPError(f"cannot read {path} ({one_line(e)}): delete it and download it again") from None


def unique_name(path):
    """A temporary name beside path that no other process or thread uses (created with the umask's permissions)."""
    return f"{path}.{os.getpid()}-{os.urandom(4).hex()}.part"


# ----------------------------------------------------------------------------------------------------------------------
# Downloads: one process downloads under a lock on the folder into a unique temporary name, checks the SHA256 and
# renames the file into place; the others wait for the lock and find the file.

@contextmanager
def locked(folder):
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: unique temporary names still keep every file whole
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def fetch(request, target, sha256):
    """Download request (a URL or urllib Request) to target unless target is there with this SHA256 -> target.
    A wrong file at target is said to be wrong and replaced; a wrong download is refused, leaving nothing."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    url = getattr(request, "full_url", request)
    with locked(folder):
        if os.path.isfile(target):
            found = sha256_of(target)
            if found == sha256:
                return target
            print(f"{target} is corrupt (SHA256 {found[:12]}..., expected {sha256[:12]}...): downloading it again",
                  file=sys.stderr)
        print(f"downloading {url} -> {target}", file=sys.stderr)
        partial = unique_name(target)
        try:
            with open(partial, "xb") as out, urllib.request.urlopen(request, timeout=60) as source:
                shutil.copyfileobj(source, out, 1 << 20)
            if sha256_of(partial) != sha256:
                raise CLIPError(f"download of {url} is incomplete or corrupt (SHA256 is not {sha256}): run again")
            os.replace(partial, target)
        except (OSError, http.client.HTTPException) as e:
            damaged = "the file there is corrupt: delete it, or replace it with a good copy" if \
                os.path.isfile(target) else "fetch it elsewhere and copy it there"
            raise CLIPError(f"could not download {url} to {target} ({one_line(e)}): {damaged}, or pass the file's "
                            f"path instead of the model name") from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return target


def download(url, root):
    """An OpenAI URL (.../<SHA256 of the file>/<file name>) into root once, verified -> the file's path."""
    return fetch(url, os.path.join(root, os.path.basename(url)), url.split("/")[-2])


# ----------------------------------------------------------------------------------------------------------------------
# The Hugging Face hub and its cache: $HF_ENDPOINT, $HF_TOKEN, $HF_HUB_OFFLINE; files in
# <cache>/models--ORG--NAME/blobs/<etag>, linked from snapshots/<commit>/<file>, refs/main naming the commit, as
# huggingface_hub writes them: weights that open_clip or transformers downloaded serve here, and ours serve them.

def hub_cache():
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    """The hub's answer for a large file is a redirect whose headers carry the file's SHA256: do not follow it."""

    def redirect_request(self, *args):
        return None


def _hub_get(url):
    """GET url at the hub, with $HF_TOKEN, redirects not followed -> (status, headers, body of a 200), None on 404."""
    token = os.environ.get("HF_TOKEN")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.build_opener(_KeepRedirects).open(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            return e.code, e.headers, b""
        if e.code == 404:
            return None
        why = " (private or gated: set HF_TOKEN)" if e.code in (401, 403) else ""
        raise CLIPError(f"{url}: HTTP {e.code} {e.reason}{why}") from None
    except (OSError, http.client.HTTPException) as e:
        raise CLIPError(f"cannot reach {url} ({one_line(e)}): with weights in the Hugging Face cache, set "
                        f"HF_HUB_OFFLINE=1") from None


def cached(repo, filename):
    """The path of repo's filename in the cache's snapshot of refs/main, checked against its blob's SHA256 when it
    has one; None if absent. A corrupt file raises when offline and is None (to download again) when online."""
    folder = os.path.join(hub_cache(), "models--" + repo.replace("/", "--"))
    try:
        with open(os.path.join(folder, "refs", "main")) as f:
            path = os.path.join(folder, "snapshots", f.read().strip(), filename)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    real = os.path.realpath(path)
    blob = os.path.basename(real)
    if len(blob) == 64 and sha256_of(path) != blob:  # LFS blobs are named by their SHA256
        if offline():
            raise CLIPError(f"{real} is corrupt (its SHA256 is not its name): delete it, or unset HF_HUB_OFFLINE to "
                            "download it again")
        print(f"{real} is corrupt (its SHA256 is not its name): downloading it again", file=sys.stderr)
        return None
    return path


def hub_download(repo, filename):
    """repo's filename (revision main) from $HF_ENDPOINT into the cache -> its snapshot path; None if the repo has no
    such file. Weights must come with their SHA256 (the redirect's X-Linked-Etag) and are checked against it; a small
    file answered directly is checked against its ETag, the git blob id."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/{urllib.parse.quote(filename)}"
    for _ in range(5):  # relative redirects (a renamed repo) lead to the answer
        answer = _hub_get(url)
        if answer is None:
            return None
        status, headers, body = answer
        if status == 200 or headers.get("X-Linked-Etag"):
            break
        url = urllib.parse.urljoin(url, headers.get("Location", ""))
    else:
        raise CLIPError(f"{url}: redirected 5 times without the file's SHA256 (X-Linked-Etag): cannot verify it")
    commit = headers.get("X-Repo-Commit")
    if not commit:
        raise CLIPError(f"{url} answered without X-Repo-Commit: is HF_ENDPOINT ({endpoint}) a Hugging Face hub?")
    folder = os.path.join(hub_cache(), "models--" + repo.replace("/", "--"))
    if status == 200:
        etag = headers.get("ETag", "").removeprefix("W/").strip('"')
        if etag != hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest():
            raise CLIPError(f"download of {url} is incomplete or corrupt (its git blob id is not {etag!r}): run again")
        blob = os.path.join(folder, "blobs", etag)
        write_atomic(blob, body)
    else:
        sha256 = headers["X-Linked-Etag"].removeprefix("W/").strip('"')
        if len(sha256) != 64:
            raise CLIPError(f"{url}: X-Linked-Etag {sha256!r} is not a SHA256: cannot verify {filename}")
        blob = fetch(urllib.parse.urljoin(url, headers["Location"]), os.path.join(folder, "blobs", sha256), sha256)
    link = os.path.join(folder, "snapshots", commit, filename)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    temporary = unique_name(link)
    try:
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), temporary)
    except OSError:  # no symlinks (Windows without developer mode): a copy, as huggingface_hub does
        shutil.copyfile(blob, temporary)
    os.replace(temporary, link)
    write_atomic(os.path.join(folder, "refs", "main"), commit.encode())
    return link


def write_atomic(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = unique_name(path)
    with open(temporary, "xb") as f:
        f.write(data)
    os.replace(temporary, path)


def hub_file(repo, filenames, download=True):
    """The first of filenames in the cache, else (download=True, not offline) the first the hub has -> path or None."""
    for filename in filenames:
        path = cached(repo, filename)
        if path:
            return path
    for filename in filenames if download and not offline() else []:
        path = hub_download(repo, filename)
        if path:
            return path
    return None


def hub_source(repo, path):
    return f"hf-hub:{repo}@{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"


# ----------------------------------------------------------------------------------------------------------------------
# find: a name, hf-hub:ORG/NAME, a folder or a file -> Weights

def find_openai(name, root):
    """OpenAI's file from root (~/.cache/clip), else its hub copy from the HF cache, else OpenAI's URL, else the hub
    copy from the hub. OpenAI's weights run QuickGELU, whatever a config file says."""
    url, repo = clip_model._MODELS[name], HUB_COPIES.get(name)
    target, sha256 = os.path.join(root, os.path.basename(url)), url.split("/")[-2]
    weights = lambda path, source, sha: Weights(path, True, "QuickGELU (OpenAI's weights)", source, sha)
    if os.path.isfile(target) and sha256_of(target) == sha256:
        return weights(target, url, sha256)
    for filename in LAYOUTS["open_clip"][1] if repo else []:
        path = cached(repo, filename)
        if path:
            return weights(path, hub_source(repo, path), sha256_of(path))
    if offline():
        mine = f"{target} is corrupt" if os.path.isfile(target) else f"{target} is not there"
        raise CLIPError(f"{name}: HF_HUB_OFFLINE is set, {mine} and the hub copy {repo} is not in {hub_cache()}: "
                        f"unset HF_HUB_OFFLINE, or pass a checkpoint path")
    try:
        return weights(download(url, root), url, sha256)
    except CLIPError as e:
        if not repo:
            raise
        failed = one_line(e).removeprefix("CLIPError: ")
    print(f"{name}: OpenAI's URL failed ({failed[:120]}); trying the hub copy hf-hub:{repo}", file=sys.stderr)
    try:
        path = hub_file(repo, LAYOUTS["open_clip"][1])
    except CLIPError as e:
        raise CLIPError(f"{name}: OpenAI's URL and the hub copy {repo} both failed ({e}); or pass a checkpoint "
                        "path") from None
    if path is None:
        raise CLIPError(f"{name}: the hub copy {repo} has no {' or '.join(LAYOUTS['open_clip'][1])}")
    print(f"{name}: served by the hub copy hf-hub:{repo}", file=sys.stderr)
    return weights(path, hub_source(repo, path), sha256_of(path))


def find_hub(repo):
    """hf-hub:ORG/NAME in open_clip's layout or transformers', from the cache, else from the hub -> Weights."""
    for download in (False, True):
        for config, files in LAYOUTS.values():
            if hub_file(repo, [config], download):
                path = hub_file(repo, files, download)
                if path:
                    quick, why = activation(os.path.dirname(path))
                    return Weights(path, quick, why, hub_source(repo, path), sha256_of(path))
                if download:
                    raise CLIPError(f"hf-hub:{repo} has {config} but none of {', '.join(files)}")
    where = f"in {hub_cache()} (HF_HUB_OFFLINE is set)" if offline() else "on the hub"
    raise CLIPError(f"hf-hub:{repo}: no open_clip_config.json or config.json {where}: is {repo} a CLIP repo?")


def find(name, download_root=None):
    """An OpenAI name (see clip_model.available_models()), hf-hub:ORG/NAME, a folder in open_clip's or transformers'
    layout, or a weights file (its config read from beside it) -> Weights."""
    if name in clip_model._MODELS:
        return find_openai(name, download_root or os.path.expanduser("~/.cache/clip"))
    if name.startswith("hf-hub:"):
        return find_hub(name.removeprefix("hf-hub:"))
    if os.path.isdir(name):
        for config, files in LAYOUTS.values():
            for file in files if os.path.isfile(os.path.join(name, config)) else []:
                if os.path.isfile(os.path.join(name, file)):
                    return find(os.path.join(name, file))
        raise CLIPError(f"{name} holds no CLIP weights: expected open_clip_config.json with "
                        f"{' or '.join(LAYOUTS['open_clip'][1])}, or config.json with "
                        f"{' or '.join(LAYOUTS['transformers'][1])}")
    if os.path.isfile(name):
        path = os.path.abspath(name)
        return Weights(path, *activation(os.path.dirname(path)), path, sha256_of(path))
    raise CLIPError(f"model {name!r} not found: use one of {clip_model.available_models()}, hf-hub:ORG/NAME, a folder "
                    f"or the path of a checkpoint file")
