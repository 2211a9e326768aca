"""The test Hub server itself: the download API answers the way huggingface_hub expects.

If these fail, the publishing tests would be testing against a wrong Hub.
"""

from __future__ import annotations

import pytest

from tests.hub_server import HubServer, git_blob_sha1

TOKEN = "hf_test_token"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(tokens={TOKEN: "user"}) as server:
        yield server


def test_upload_then_download_api(hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"hello")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 3)

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("user/files", private=True)
    commit = api.upload_folder(repo_id="user/files", folder_path=folder, commit_message="add files")
    info = api.model_info("user/files")
    assert commit.oid == info.sha and info.private
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "a.txt", "sub/b.bin"]
    assert sorted(api.list_repo_files("user/files")) == [".gitattributes", "a.txt", "sub/b.bin"]

    cache = tmp_path / "cache"
    path = hf_hub_download("user/files", "sub/b.bin", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    assert open(path, "rb").read() == (folder / "sub" / "b.bin").read_bytes()
    assert f"snapshots/{info.sha}/sub/b.bin" in path
    snap = snapshot_download("user/files", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache2")
    assert (tmp_path / "cache2").exists() and open(f"{snap}/a.txt", "rb").read() == b"hello"

    # The metadata huggingface_hub reads from HEAD: commit, ETag = git blob id, size.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url("user/files", "a.txt", endpoint=hub.url), token=TOKEN)
    assert (meta.commit_hash, meta.etag, meta.size) == (info.sha, git_blob_sha1(b"hello"), 5)

    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/files", "missing.txt", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/files", "a.txt", revision="nope", endpoint=hub.url, token=TOKEN, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without a token
        hf_hub_download("user/files", "a.txt", endpoint=hub.url, token=False, cache_dir=tmp_path / "cache3")
    assert not api.file_exists("user/files", "config.json") and api.file_exists("user/files", "a.txt")


def test_auth_and_failure_modes(hub, tmp_path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo("user/r")
    assert info.value.response.status_code == 401
    api = HfApi(endpoint=hub.url, token=TOKEN)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo("someone-else/r")
    assert info.value.response.status_code == 403
    api.create_repo("user/r")
    hub.fail_commit_status = 500
    with pytest.raises(HfHubHTTPError) as info:
        api.upload_folder(repo_id="user/r", folder_path=tmp_path)
    assert info.value.response.status_code == 500
    assert "f.txt" not in hub.files("user/r")
