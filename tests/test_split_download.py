"""data.py --download fetches CoOp's split file from the pinned GitHub copy (a loopback server here), checks its git
blob id, and puts it where CoOp's layout expects it; an altered or unreachable file is refused, leaving nothing."""
import hashlib
import http.server
import json
import os
import sys
import threading

import pytest
from PIL import Image

import data
from data import DataError, load_dataset

NAME = "split_zhou_DescribableTextures.json"
SPLIT = {"train": [["a/a1.jpg", 0, "a"], ["b/b1.jpg", 1, "b"]], "val": [["a/a2.jpg", 0, "a"], ["b/b2.jpg", 1, "b"]],
         "test": [["a/a3.jpg", 0, "a"], ["b/b3.jpg", 1, "b"]]}


class Files(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.files, self.requests = {}, []


class FileHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def github(monkeypatch):
    server = Files()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "SPLITS_URL", f"http://127.0.0.1:{server.server_address[1]}/splits")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def dtd(tmp_path):
    """dtd's images in CoOp's layout, without the split file."""
    for path, _, _ in SPLIT["train"] + SPLIT["val"] + SPLIT["test"]:
        os.makedirs(tmp_path / "dtd" / "images" / os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "dtd" / "images" / path)
    return tmp_path


def serve(github, monkeypatch, body, pinned):
    github.files[f"/splits/{NAME}"] = body
    blob_id = hashlib.sha1(b"blob %d\0" % len(pinned) + pinned).hexdigest()  # what `git hash-object` prints
    monkeypatch.setitem(data.SPLIT_BLOB_IDS, NAME, blob_id)


def test_every_split_file_has_a_pinned_copy():
    assert data.SPLITS_URL == ("https://raw.githubusercontent.com/linzhiqiu/cross_modal_adaptation/"
                               "ac9077ee4e422f768c9b9109551468605e33ec9a/splits")
    assert sorted(data.SPLIT_BLOB_IDS) == sorted(s["split"] for s in data.DATASETS.values() if "split" in s)
    assert data.SPLIT_BLOB_IDS["split_zhou_DescribableTextures.json"] == "8dd197a94b598fa44ee3c9e35c486dd017ab00a7"
    assert data.git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # echo hello | git hash-object --stdin


def test_download_fetches_verifies_and_places_the_split_file(dtd, github, monkeypatch):
    body = json.dumps(SPLIT).encode()
    serve(github, monkeypatch, body, pinned=body)
    logs = []
    d = load_dataset("dtd", str(dtd), download=True, log=logs.append)
    assert (dtd / "dtd" / NAME).read_bytes() == body
    assert sorted(os.listdir(dtd / "dtd")) == ["images", NAME]  # no temporary file left
    assert d.classnames == ["a", "b"] and len(d.train) == len(d.val) == len(d.test) == 2
    assert github.requests == [f"/splits/{NAME}"] and NAME in logs[0] and not any("NOT comparable" in m for m in logs)
    load_dataset("dtd", str(dtd), download=True, log=logs.append)
    assert len(github.requests) == 1  # there now: not fetched again


@pytest.mark.parametrize("served", ["altered", "missing", "unreachable"])
def test_an_altered_or_unreachable_split_file_is_refused_leaving_nothing(dtd, github, monkeypatch, served):
    body = json.dumps(SPLIT).encode()
    serve(github, monkeypatch, body.replace(b'"a/a3.jpg"', b'"b/b3.jpg"') if served == "altered" else body,
          pinned=body)
    if served == "missing":
        github.files.clear()
    if served == "unreachable":
        monkeypatch.setattr(data, "SPLITS_URL", "http://127.0.0.1:9/splits")
    with pytest.raises(DataError) as excinfo:
        load_dataset("dtd", str(dtd), download=True, log=lambda m: None)
    message = str(excinfo.value)
    assert NAME in message and data.SPLITS_URL in message and str(dtd / "dtd") in message and "\n" not in message
    assert ("not the pinned" in message) == (served == "altered")
    assert sorted(os.listdir(dtd / "dtd")) == ["images"]


def test_cli_download_and_transforms_printed_without_memory_addresses(dtd, github, monkeypatch, capsys):
    body = json.dumps(SPLIT).encode()
    serve(github, monkeypatch, body, pinned=body)
    monkeypatch.setattr(sys, "argv", ["data.py", "--dataset", "dtd", "--root", str(dtd), "--download"])
    data.main()
    out = capsys.readouterr().out
    assert (dtd / "dtd" / NAME).read_bytes() == body
    assert "test transform: Compose(" in out and "<function _to_rgb>" in out and " at 0x" not in out
