"""The background layer worker: results in order, errors at the caller, no work after close, and a
conversion's bytes unchanged by it (its output equals a run that converts every layer in turn)."""

import threading
import time

import pytest
import torch

from transgqla import convert as convert_module
from transgqla.errors import InputError
from transgqla.io import SafetensorsCheckpoint
from transgqla.layer_prefetch import LayerPrefetcher

from helpers import run_convert


def test_results_come_in_order_computed_on_one_worker_thread():
    seen: list[tuple[int, str]] = []

    def work(layer):
        seen.append((layer, threading.current_thread().name))
        return layer * 10

    with LayerPrefetcher(work, [0, 2, 5], ahead=1) as pf:
        assert [pf.get(0), pf.get(2), pf.get(5)] == [0, 20, 50]
    assert [layer for layer, _ in seen] == [0, 2, 5]
    assert {name for _, name in seen} == {"transgqla-layers-0"}


def test_two_workers_share_the_layers_and_results_still_come_in_order():
    seen: dict[int, str] = {}

    def work(layer):
        time.sleep(0.02 * (layer % 3))  # uneven work: finish order differs from the layer order
        seen[layer] = threading.current_thread().name
        return -layer

    layers = list(range(9))
    with LayerPrefetcher(work, layers, ahead=1, workers=2) as pf:
        assert [pf.get(layer) for layer in layers] == [-layer for layer in layers]
    assert {seen[layer] for layer in layers[0::2]} == {"transgqla-layers-0"}
    assert {seen[layer] for layer in layers[1::2]} == {"transgqla-layers-1"}


def test_asking_out_of_order_is_refused():
    with LayerPrefetcher(lambda l: l, [0, 1]) as pf:
        with pytest.raises(ValueError, match="out of order"):
            pf.get(1)


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_error_reaches_the_caller_at_that_layer(workers):
    def work(layer):
        if layer == 2:
            raise InputError("tensor model.layers.2.self_attn.k_proj.weight holds NaN or Inf values")
        return layer

    pf = LayerPrefetcher(work, [0, 1, 2, 3], workers=workers)
    assert pf.get(0) == 0 and pf.get(1) == 1
    with pytest.raises(InputError, match="NaN"):
        pf.get(2)
    assert not any(t.is_alive() for t in pf._threads)


def test_close_stops_the_worker_between_layers():
    started: list[int] = []
    release = threading.Event()

    def work(layer):
        started.append(layer)
        release.wait(5)
        return layer

    pf = LayerPrefetcher(work, range(10), ahead=1)
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:  # layer 0 is being computed
        time.sleep(0.01)
    threading.Timer(0.3, release.set).start()
    pf.close()  # waits for layer 0 to finish, starts nothing more
    assert release.is_set()  # it returned only after the running layer was let go
    assert not any(t.is_alive() for t in pf._threads)
    assert started == [0]


def test_worker_stays_at_most_the_allowed_layers_ahead():
    done: list[int] = []

    def work(layer):
        done.append(layer)
        return layer

    def settle(n):  # wait until the worker has done n layers, then give it time to (wrongly) do more
        deadline = time.monotonic() + 10
        while len(done) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)

    pf = LayerPrefetcher(work, range(10), ahead=1)
    settle(2)
    # one result waiting in the queue, one finished and waiting to be queued
    assert len(done) == 2
    pf.get(0)
    settle(3)
    assert len(done) == 3
    pf.close()


def test_zero_workers_compute_on_the_callers_thread():
    names: list[str] = []
    pf = LayerPrefetcher(lambda l: names.append(threading.current_thread().name) or l, [3, 4], workers=0)
    assert (pf.get(3), pf.get(4)) == (3, 4)
    assert names == [threading.current_thread().name] * 2
    pf.close()


def test_conversion_bytes_do_not_depend_on_the_number_of_workers(source_factory, tmp_path, monkeypatch):
    """0 workers (every layer converted in turn in the writer's thread), 1 and the default 2: identical bytes."""
    src, _ = source_factory("qwen2", n_kv=2, n_heads=4, head_dim=16, layers=5)
    before = torch.get_num_threads()
    outs = {}
    for workers in ("0", "1", ""):
        monkeypatch.setenv(convert_module.LAYER_WORKERS_ENV, workers)
        outs[workers] = tmp_path / f"w{workers or 'default'}"
        run_convert(src, outs[workers], qk_rope_dim=8, kv_lora_rank=24)
        assert torch.get_num_threads() == before  # the pinned count does not leak out
    ref = SafetensorsCheckpoint(outs["0"])
    for workers in ("1", ""):
        other = SafetensorsCheckpoint(outs[workers])
        assert other.names == ref.names
        for name in ref.names:
            assert other.read_bytes(name) == ref.read_bytes(name), (workers, name)
        assert (outs[workers] / "config.json").read_bytes() == (outs["0"] / "config.json").read_bytes()


def test_layer_workers_setting_is_checked(source_factory, tmp_path, monkeypatch):
    src, _ = source_factory("llama", n_kv=2, n_heads=4, head_dim=16, layers=1)
    monkeypatch.setenv(convert_module.LAYER_WORKERS_ENV, "-1")
    with pytest.raises(InputError, match="TRANSGQLA_LAYER_WORKERS must be a non-negative integer"):
        run_convert(src, tmp_path / "out", qk_rope_dim=8, kv_lora_rank=24)
    assert not (tmp_path / "out").exists()


def test_close_abandons_a_layer_in_the_middle_of_its_torch_work():
    """Ctrl-C must not wait for a long layer: the worker stops at its next torch call."""
    started, finished = threading.Event(), []

    def work(layer):
        x = torch.ones(8)
        started.set()
        for _ in range(10**7):  # far longer than any test: only abandoning ends it early
            x = x * 1.0
        finished.append(layer)
        return layer

    pf = LayerPrefetcher(work, range(3), ahead=1)
    assert started.wait(30)
    pf.close()
    assert not any(t.is_alive() for t in pf._threads)
    assert finished == []
