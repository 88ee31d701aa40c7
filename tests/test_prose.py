"""The second offline text domain (transgqla/text/prose.py): fortune files -> two disjoint prose texts."""

from __future__ import annotations

import pytest

from transgqla.errors import InputError
from transgqla.text import prose
from transgqla.text.builtin import builtin_text, split_documents


def _write_fortunes(folder, files: dict[str, list[str]]):
    folder.mkdir()
    for name, entries in files.items():
        (folder / name).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
        (folder / f"{name}.dat").write_bytes(b"\x00\x01binary index")
    return folder


@pytest.fixture
def fortunes(tmp_path, monkeypatch):
    entries = {
        "wisdom": [f"\tWisdom number {i} is that patience\nbeats   haste on most days.\n\t\t-- Author {i}"
                   for i in range(40)],
        "people": [f"Person {i} once said that the sea is wide and the boat is small." for i in range(40)],
        "computers": ["The compiler is the programmer's best friend, said nobody ever."],
        "art": ["@@@@ #### $$$$ %%%% ^^^^ &&&& **** ((((", "Art is long and life is short, as the old saying goes."],
    }
    entries["people"].append(entries["wisdom"][0])  # a duplicate across files
    folder = _write_fortunes(tmp_path / "fortunes", entries)
    monkeypatch.setenv(prose.FORTUNE_DIR_ENV, str(folder))
    prose._split.cache_clear()
    yield folder
    prose._split.cache_clear()


def test_fortune_documents_are_clean_deduplicated_and_skip_technical_files(fortunes):
    docs = prose.fortune_documents(fortunes)
    assert len(docs) == 40 + 40 + 1  # wisdom, people (duplicate dropped), the prose line of "art"
    assert "Wisdom number 3 is that patience\nbeats haste on most days.\n-- Author 3" in docs
    assert not any("compiler" in d or "@@@@" in d or "index" in d for d in docs)
    assert docs == prose.fortune_documents(fortunes)  # a fixed order


def test_prose_texts_are_disjoint_mixed_and_deterministic(fortunes):
    calib, ev = builtin_text("prose-calib"), builtin_text("prose-eval")
    pc, pe = set(calib.strip().split("\n\n")), set(ev.strip().split("\n\n"))
    assert not pc & pe
    assert len(pc | pe) == 81 and abs(len(calib) - len(ev)) < 200  # everything, dealt evenly
    assert any(p.startswith("Wisdom") for p in pc) and any(p.startswith("Person") for p in pc)  # both files
    prose._split.cache_clear()
    assert builtin_text("prose-calib") == calib


def test_missing_collection_is_a_one_line_input_error(tmp_path, monkeypatch):
    monkeypatch.setenv(prose.FORTUNE_DIR_ENV, str(tmp_path / "absent"))
    prose._split.cache_clear()
    with pytest.raises(InputError, match="apt-get install fortunes"):
        builtin_text("prose-eval")
    with pytest.raises(InputError, match="prose-calib"):
        builtin_text("novels")
    prose._split.cache_clear()


def test_split_documents_stops_at_the_target_and_balances():
    docs = [(f"d{i}", [f"paragraph {i} " + "x" * 98]) for i in range(100)]  # 112 chars each
    out = split_documents(iter(docs), ("a", "b"), 1000)
    a, b = out["a"].strip().split("\n\n"), out["b"].strip().split("\n\n")
    assert len(a) == len(b) == 9  # 9 x 112 >= 1000: both sides reached the target, then it stopped
    assert a[0].startswith("paragraph 0 ") and b[0].startswith("paragraph 1 ")


@pytest.mark.skipif(not prose.FORTUNE_DIR.is_dir(), reason="Debian's fortunes package is not installed")
def test_installed_collection_gives_two_large_texts(monkeypatch):
    monkeypatch.delenv(prose.FORTUNE_DIR_ENV, raising=False)
    prose._split.cache_clear()
    calib, ev = builtin_text("prose-calib"), builtin_text("prose-eval")
    for text in (calib, ev):
        assert len(text) >= 250_000
        words = text.split()
        assert sum(w.isalpha() for w in words) / len(words) > 0.6
    assert not set(calib.split("\n\n")) & set(ev.split("\n\n"))
