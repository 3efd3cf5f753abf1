"""Downloads against real HTTP servers on 127.0.0.1 (flaky ones written here), NANOCHAT_MIRROR, shard reading."""
import http.server
import itertools
import os
import threading
import time

import pyarrow.parquet as pq
import pytest

import common


@pytest.fixture
def flaky_server(shared_data):
    """Serve shard_00012 through a scripted handler: `behaviours` is a list consumed one per GET
    ('500', 'cut', '404', 'slow', 'garbage', 'ok'; 'ok' once the list is empty). Yields (url, state)."""
    data = (shared_data / "pretrain" / "shard_00012.parquet").read_bytes()
    state = {"behaviours": [], "gets": 0, "data": data}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            with lock:
                state["gets"] += 1
                behaviour = state["behaviours"].pop(0) if state["behaviours"] else "ok"
            if behaviour in ("500", "404"):
                self.send_error(int(behaviour))
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))  # for 'cut' this is a lie
            self.end_headers()
            if behaviour == "garbage":  # the right length, bytes mangled on the way
                self.wfile.write(bytes(len(data)))
                return
            if behaviour == "cut":
                self.wfile.write(data[: len(data) // 3])
                self.close_connection = True
                return
            if behaviour == "slow":  # keep the first downloader busy while the second one arrives
                for i in range(0, len(data), len(data) // 10):
                    self.wfile.write(data[i:i + len(data) // 10])
                    time.sleep(0.05)
                return
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/shard_00012.parquet", state
    server.shutdown()


def leftovers(directory):
    return [f for f in os.listdir(directory) if ".tmp" in f]


def test_download_identical_bytes(http_mirror, shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", http_mirror)
    source = common.source_for(common.SHARD_URL.format(3), "pretrain/shard_00003.parquet")
    assert source == f"{http_mirror}/pretrain/shard_00003.parquet"
    dest = common.download_file(source, str(base_dir / "x" / "shard.parquet"), desc="shard 3")
    assert open(dest, "rb").read() == (shared_data / "pretrain" / "shard_00003.parquet").read_bytes()


@pytest.mark.parametrize("behaviours", [["500"], ["500", "cut"], ["cut", "cut"]])
def test_retries_until_success(flaky_server, base_dir, behaviours):
    url, state = flaky_server
    state["behaviours"] = list(behaviours)
    dest = common.download_file(url, str(base_dir / "shard.parquet"), backoff=0)
    assert state["gets"] == len(behaviours) + 1
    assert open(dest, "rb").read() == state["data"]
    assert leftovers(base_dir) == []


def test_a_download_that_is_not_parquet_is_fetched_again(flaky_server, base_dir):
    """Checked before it takes its name: a body of the right length that is not a parquet file is retried."""
    url, state = flaky_server
    state["behaviours"] = ["garbage"]
    dest = common.download_file(url, str(base_dir / "shard.parquet"), backoff=0)
    assert state["gets"] == 2 and open(dest, "rb").read() == state["data"] and leftovers(base_dir) == []
    state["behaviours"] = ["garbage"] * 2
    with pytest.raises(common.NanochatError, match="not a readable parquet file"):
        common.download_file(url, str(base_dir / "other.parquet"), attempts=2, backoff=0)
    assert not (base_dir / "other.parquet").exists() and leftovers(base_dir) == []


@pytest.mark.parametrize("corruption", ["empty", "truncated", "garbage"])
def test_a_corrupt_file_already_there_is_fetched_again(flaky_server, base_dir, corruption):
    url, state = flaky_server
    dest = base_dir / "shard.parquet"
    dest.write_bytes({"empty": b"", "truncated": state["data"][:-1000], "garbage": b"x" * 5000}[corruption])
    assert common.download_file(url, str(dest), backoff=0) == str(dest)
    assert state["gets"] == 1 and dest.read_bytes() == state["data"]
    common.download_file(url, str(dest), backoff=0)  # now sound: not fetched again
    assert state["gets"] == 1


def test_gives_up_with_clear_error(flaky_server, base_dir):
    url, state = flaky_server
    state["behaviours"] = ["cut"] * 3
    with pytest.raises(common.NanochatError, match="could not download .*NANOCHAT_MIRROR"):
        common.download_file(url, str(base_dir / "shard.parquet"), attempts=3, backoff=0)
    assert state["gets"] == 3
    assert not (base_dir / "shard.parquet").exists() and leftovers(base_dir) == []


def test_404_is_not_retried(flaky_server, base_dir):
    url, state = flaky_server
    state["behaviours"] = ["404"]
    with pytest.raises(common.NanochatError, match="HTTP 404"):
        common.download_file(url, str(base_dir / "shard.parquet"), backoff=0)
    assert state["gets"] == 1
    assert not (base_dir / "shard.parquet").exists() and leftovers(base_dir) == []


def test_no_network_fails_fast_with_one_line(base_dir):
    # a port nobody listens on: connection refused on the first attempt means no network, no retries
    with pytest.raises(common.NanochatError) as err:
        common.download_file("http://127.0.0.1:9/shard.parquet", str(base_dir / "shard.parquet"))
    message = str(err.value)
    assert "NANOCHAT_MIRROR" in message and "\n" not in message and err.value.code == message


def test_concurrent_downloaders_share_one_download(flaky_server, base_dir):
    url, state = flaky_server
    state["behaviours"] = ["slow"]
    dest = str(base_dir / "shard.parquet")
    results = []
    threads = [threading.Thread(target=lambda: results.append(common.download_file(url, dest, backoff=0)))
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert results == [dest, dest]
    assert state["gets"] == 1  # the second waited on the lock, then found the file
    assert open(dest, "rb").read() == state["data"] and leftovers(base_dir) == []


@pytest.mark.parametrize("mirror_kind", ["url", "dir"])
def test_download_shards_from_mirror(mirror_kind, http_mirror, shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", http_mirror if mirror_kind == "url" else str(shared_data))
    assert common.num_source_shards() == 13
    paths = common.download_shards(2, num_workers=2)
    assert [os.path.basename(p) for p in paths] == ["shard_00012.parquet", "shard_00000.parquet", "shard_00001.parquet"]
    for p in paths:
        assert open(p, "rb").read() == (shared_data / "pretrain" / os.path.basename(p)).read_bytes()
    assert common.split_files("val") == [paths[0]] and common.split_files("train") == sorted(paths[1:])


def test_background_download(shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    future = common.download_shards(1, background=True)
    assert sorted(os.path.basename(p) for p in future.result(timeout=60)) == ["shard_00000.parquet", "shard_00012.parquet"]


def test_missing_file_in_local_mirror(tmp_path, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(tmp_path))
    with pytest.raises(common.NanochatError, match="no such file"):
        common.download_shard(0)


def test_real_shards_rank_striding_and_resume(shared_data, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MIRROR", str(shared_data))
    common.download_shards(2)
    files = common.split_files("train")

    def first_epoch(rank, world, start=None):
        batches = common.iter_doc_batches(files, rank, world, start)
        return [position for position, _ in itertools.takewhile(lambda b: b[0][0] == 1, batches)]
    everything = first_epoch(0, 1)
    num_rg = [pq.ParquetFile(f).num_row_groups for f in files]
    assert sorted({p[1:3] for p in everything}) == [(p, r) for p in range(2) for r in range(num_rg[p])]
    per_rank = [first_epoch(rank, 3) for rank in range(3)]
    assert sorted(sum(per_rank, [])) == sorted(everything)
    assert all(p[2] % 3 == rank for rank in range(3) for p in per_rank[rank])
    resumed = first_epoch(1, 3, start=per_rank[1][3])
    assert resumed == per_rank[1][3:]
    (position, texts), = itertools.islice(common.iter_doc_batches(common.split_files("val"), 0, 1), 1)
    val = pq.read_table(shared_data / "pretrain" / "shard_00012.parquet").column("text").to_pylist()
    assert position == (1, 0, 0, 0) and texts == val[:len(texts)]


def test_no_shards_is_a_clear_error(base_dir):
    with pytest.raises(common.NanochatError, match="no pretraining shards"):
        common.list_parquet_files()
