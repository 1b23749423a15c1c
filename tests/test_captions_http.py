"""The OpenAI-compatible captioner against a local fake server with injected faults."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, colour_caption

from llmvem.captions import CaptionStore, run_captioning
from llmvem.captions.openai_compat import OpenAICaptioner, chat_completions_url
from llmvem.data.images import ArrayImages
from llmvem.errors import CaptionError, ConfigError

SENTINEL = "sk-SENTINEL-9f8e7d6c5b4a"


def colour_images(n: int) -> tuple[ArrayImages, list[tuple[int, int, int]]]:
    """Flat images with distinct colours (multiples of 10, so JPEG round-trips to the same rounded colour)."""
    colours = [(10 * (i % 25), 10 * ((i * 7) % 25), 10 * ((i // 25) + 5)) for i in range(n)]
    arr = np.stack([np.full((12, 12, 3), c, dtype=np.uint8) for c in colours])
    return ArrayImages(arr, ids=[f"img{i:02d}" for i in range(n)]), colours


def fast(srv: FakeOpenAIServer, **kw) -> OpenAICaptioner:
    opts = {"timeout_s": 0.5, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 3, "max_in_flight": 4}
    opts.update(kw)
    return OpenAICaptioner("fake-vlm", srv.base_url, **opts)


@pytest.mark.parametrize("fault", ["500", "503", "429", "timeout", "malformed", "no_choices", "empty", "drop"])
def test_survives_each_fault_type(fault):
    images, colours = colour_images(6)
    # the first two requests fail with the fault, everything after succeeds
    with FakeOpenAIServer(fault_plan=lambda n, c: fault if n <= 2 else None, hang_s=2.0) as srv:
        cap = fast(srv)
        results = [r for group in cap.caption_collection(images, range(6), batch_size=4) for r in group]
        assert sorted(srv.faults) == [(1, fault), (2, fault)]
        assert srv.n_requests == 8  # 6 images + 2 retries
    assert sorted(r.index for r in results) == list(range(6))
    for r in results:
        assert r.ok and r.captions == [colour_caption(colours[r.index])]


def test_retry_after_is_honoured_and_backoff_capped():
    images, colours = colour_images(1)
    with FakeOpenAIServer(fault_plan=lambda n, c: "429" if n <= 2 else None, retry_after_s=0.3) as srv:
        cap = fast(srv, backoff_max_s=1.0)
        t0 = time.perf_counter()
        assert cap.caption([images.load(0)]) == [[colour_caption(colours[0])]]
        waited = time.perf_counter() - t0
    assert 0.6 <= waited < 2.0  # two Retry-After waits of 0.3 s
    cap = OpenAICaptioner("m", "http://127.0.0.1:9/v1", backoff_base_s=0.5, backoff_max_s=2.0)
    waits = [cap._backoff(k, None) for k in range(8)]
    assert all(0.125 <= w <= 0.5 for w in waits[:1]) and all(1.0 <= w <= 2.0 for w in waits[2:])
    assert cap._backoff(0, 100.0) < 2.1  # a huge Retry-After is capped too


def test_persistent_failures_reported_without_losing_finished(tmp_path):
    images, colours = colour_images(12)
    bad = {colours[3], colours[8]}
    with FakeOpenAIServer(fault_plan=lambda n, c: "500" if c in bad else None) as srv:
        cap = fast(srv, max_retries=2)
        with CaptionStore(tmp_path / "c.sqlite") as store:
            summary = run_captioning(images, cap, store, batch_size=5, show_progress=False)
            assert (summary.done, summary.failed, summary.skipped) == (10, 2, 0)
            assert sorted(summary.failed_ids) == ["img03", "img08"]
            assert "failed after 3 attempts; last error: HTTP 500" in summary.errors["img03"]
            got = store.get_for(images, missing="empty")
            assert [bool(g) for g in got] == [i not in (3, 8) for i in range(12)]
            assert got[0] == [colour_caption(colours[0])]
            # a direct batch call raises one CaptionError naming the failed images
            with pytest.raises(CaptionError, match=r"captioning failed for 2 image\(s\): x3: failed after 3"):
                cap.caption([images.load(i) for i in (2, 3, 8)], ["x2", "x3", "x8"])
        assert srv.n_requests == 10 + 2 * 3 + 1 + 2 * 3


def test_max_in_flight_is_a_hard_bound():
    images, _ = colour_images(20)
    with FakeOpenAIServer(delay_s=0.05) as srv:
        list(OpenAICaptioner("fake-vlm", srv.base_url, max_in_flight=3).caption_collection(images, range(20)))
        assert srv.n_requests == 20
        assert srv.max_seen_in_flight == 3


def test_fan_out_over_servers():
    images, colours = colour_images(24)
    with FakeOpenAIServer(delay_s=0.05) as a, FakeOpenAIServer(delay_s=0.05) as b:
        cap = OpenAICaptioner("fake-vlm", [a.base_url, b.base_url + "/"], max_in_flight=6)
        results = [r for g in cap.caption_collection(images, range(24), batch_size=8) for r in g]
        assert a.n_requests + b.n_requests == 24
        assert min(a.n_requests, b.n_requests) >= 9  # least-loaded spreads the work about evenly
        assert max(a.max_seen_in_flight, b.max_seen_in_flight) <= 4
    assert sorted(r.index for r in results) == list(range(24))
    assert all(r.captions == [colour_caption(colours[r.index])] for r in results)


def test_results_stream_in_groups_no_larger_than_batch():
    images, _ = colour_images(10)
    with FakeOpenAIServer() as srv:
        groups = list(fast(srv, max_in_flight=8).caption_collection(images, range(10), batch_size=3))
    assert sum(len(g) for g in groups) == 10 and max(len(g) for g in groups) <= 3


def test_wrong_model_or_key_stops_with_clear_error(monkeypatch):
    images, _ = colour_images(3)
    with FakeOpenAIServer() as srv:
        cap = OpenAICaptioner("no-such-model", srv.base_url, max_in_flight=1)
        with pytest.raises(CaptionError, match=r"HTTP 404 .*check --base-url and --model 'no-such-model'"):
            list(cap.caption_collection(images, range(3)))
    monkeypatch.setenv("MY_KEY", SENTINEL)
    with FakeOpenAIServer(fault_plan=lambda n, c: "401") as srv:
        cap = OpenAICaptioner("fake-vlm", srv.base_url, api_key_env="MY_KEY")
        with pytest.raises(CaptionError, match=r"HTTP 401 .*refused the API key; set \$MY_KEY") as err:
            cap.caption([images.load(0)])
        assert SENTINEL not in str(err.value)
        assert srv.auth_headers == [f"Bearer {SENTINEL}"]


def test_400_fails_only_that_image():
    images, colours = colour_images(4)
    with FakeOpenAIServer(fault_plan=lambda n, c: "400" if c == colours[1] else None) as srv:
        results = fast(srv).caption_batch([images.load(i) for i in range(4)], images.ids)
        assert srv.n_requests == 4  # not retried
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].error.startswith("HTTP 400")


def test_api_key_only_in_header(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    caplog.set_level(logging.DEBUG)
    images, _ = colour_images(5)
    with FakeOpenAIServer(fault_plan=lambda n, c: "500" if n == 1 else None) as srv:
        cap = fast(srv)
        assert SENTINEL not in repr(cap) and SENTINEL not in repr(vars(cap))
        assert SENTINEL not in str(cap.identity()) + str(cap.runtime())
        assert cap.runtime()["api_key_env"] == "OPENAI_API_KEY"
        with CaptionStore(tmp_path / "k.sqlite") as store:
            run_captioning(images, cap, store, show_progress=False)
            store.export(tmp_path / "k.json")
            store.export(tmp_path / "k.csv")
        assert set(srv.auth_headers) == {f"Bearer {SENTINEL}"}
    for f in tmp_path.iterdir():
        assert SENTINEL.encode() not in f.read_bytes(), f
    assert SENTINEL not in caplog.text
    assert "retry 1/3" in caplog.text  # the retry was logged (without the key)


def test_no_key_no_header(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    images, _ = colour_images(1)
    with FakeOpenAIServer() as srv:
        fast(srv).caption([images.load(0)])
        assert srv.auth_headers == [None]


def test_request_body_and_settings():
    images, _ = colour_images(1)
    with FakeOpenAIServer() as srv:
        cap = OpenAICaptioner("fake-vlm", srv.base_url, max_tokens=77, temperature=0.0, seed=3,
                              extra_body={"top_k": 1})
        cap.caption([images.load(0)])
        assert srv.bodies == [{"model": "fake-vlm", "max_tokens": 77, "temperature": 0.0, "seed": 3, "top_k": 1}]
    assert cap.settings()["extra_body"] == {"top_k": 1}
    assert OpenAICaptioner("fake-vlm", "http://a:1/v1", max_tokens=78).config_hash != cap.config_hash
    # server URLs and concurrency are runtime options: same captions, same hash
    same = OpenAICaptioner("fake-vlm", ["http://b:2/v1", "http://c:3/v1"], max_tokens=77, seed=3,
                           extra_body={"top_k": 1}, max_in_flight=99)
    assert same.config_hash == cap.config_hash


def test_url_and_option_validation():
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://api.x.com/v1/chat/completions") == "https://api.x.com/v1/chat/completions"
    with pytest.raises(ConfigError, match="expected http://host:port/v1"):
        OpenAICaptioner("m", "localhost:8000")
    with pytest.raises(ConfigError, match="max_in_flight=0"):
        OpenAICaptioner("m", "http://h/v1", max_in_flight=0)


def test_unreadable_image_fails_alone(tmp_path):
    from llmvem.data.images import FileImages

    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (30, 60, 90)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    images = FileImages([good, broken])
    with FakeOpenAIServer() as srv:
        results = [r for g in fast(srv).caption_collection(images, range(2)) for r in g]
        assert srv.n_requests == 1
    by_id = {r.image_id: r for r in results}
    assert by_id["good"].captions == [colour_caption((30, 60, 90))]
    assert "cannot read image" in by_id["broken"].error and "broken.png" in by_id["broken"].error
