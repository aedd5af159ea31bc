import io
import urllib.error

import pytest

from efficientml.core.errors import DataNotFoundError
from efficientml.data import paths
from efficientml.data.cifar_samples import load_cifar_samples
from efficientml.data.text import TEXTS, load_text

_REAL_ROOTS = paths.data_roots  # captured before any test replaces it


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "data_roots", lambda: [tmp_path / "empty"])
    monkeypatch.setenv("EFFICIENTML_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_offline_errors_name_env_var_and_file(no_local_data, monkeypatch):
    calls = []

    def offline(url, *a, **k):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataNotFoundError, match=r"text/tinyshakespeare\.txt.*EFFICIENTML_DATA"):
        load_text("tinyshakespeare")
    assert calls == ["https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"]
    with pytest.raises(DataNotFoundError, match=r"cifar10_00_3\.png.*EFFICIENTML_DATA"):
        load_cifar_samples()
    # no canonical copy of the shared raw WikiText-2 file: no download is tried
    with pytest.raises(DataNotFoundError, match=r"wikitext-2-raw-test\.raw.*EFFICIENTML_DATA"):
        load_text("wikitext2-raw-test")
    assert len(calls) == 2
    assert not any((no_local_data / "cache").rglob("*.*"))  # nothing half-written


def test_download_checked_by_sha256(no_local_data, monkeypatch):
    real = paths.resolve(TEXTS["tinyshakespeare"].relpath, roots=_REAL_ROOTS())
    payload = {"bytes": real.read_bytes()}
    monkeypatch.setattr("urllib.request.urlopen", lambda url, *a, **k: io.BytesIO(payload["bytes"]))
    assert len(load_text("tinyshakespeare")) == 1_115_394
    assert (no_local_data / "cache" / "text" / "tinyshakespeare.txt").is_file()

    payload["bytes"] = b"tampered"
    with pytest.raises(DataNotFoundError, match="sha256"):
        load_text("wikitext2-test")
    assert not (no_local_data / "cache" / "text" / "wikitext-2-test.tokens").exists()
