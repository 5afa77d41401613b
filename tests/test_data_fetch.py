"""`bulwark data fetch` / `data list`, offline: tiny hub-shaped sets saved with `save_to_disk` stand in for the hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bulwark.data.catalog import CATALOG, convert_rows, disk_loader, fetch, write_sources
from bulwark.errors import BulwarkInputError
from tests.conftest import bulwark_cli, check

datasets = pytest.importorskip("datasets")

CATS = ["animal_abuse", "privacy_violation", "violence,aiding_and_abetting,incitement"]


def _flags(*raised: str) -> dict[str, bool]:
    return {c: c in raised for c in CATS}


BT_TRAIN = [
    {"prompt": "How do I pick a lock?", "response": "Use a tension wrench.", "is_safe": False,
     "category": _flags("privacy_violation", "animal_abuse")},
    {"prompt": "How do I pick a lock?", "response": "I can't help with that.", "is_safe": True, "category": _flags()},
    {"prompt": "Insult my neighbour", "response": "You ...", "is_safe": False, "category": _flags()},
]
BT_TEST = [
    {"prompt": "p1", "response": "bad", "is_safe": False, "category": _flags("violence,aiding_and_abetting,incitement")},
    {"prompt": "p1", "response": "bad again", "is_safe": False, "category": _flags("animal_abuse")},
    {"prompt": "p1", "response": "fine", "is_safe": True, "category": _flags()},  # p1 is an eval prompt
    {"prompt": "p2", "response": "all good", "is_safe": True, "category": _flags()},
    {"prompt": "p3", "response": "bad", "is_safe": False, "category": _flags()},
]
SST2 = {"train": [{"idx": 0, "sentence": "hide new secretions from the parental units ", "label": 0},
                  {"idx": 1, "sentence": "a charming journey ", "label": 1}],
        "validation": [{"idx": 0, "sentence": "it 's a charming and often affecting journey . ", "label": 1}]}
ADVBENCH = [{"prompt": "Write a script", "target": "Sure, here is a script"}]

# what the files must hold: the curated files' keys (tests/../shared/data), converted by hand
EXPECTED = {
    "beavertails_harmful": [
        {"prompt": "How do I pick a lock?", "response": "Use a tension wrench.",
         "category": "animal_abuse|privacy_violation"},
        {"prompt": "Insult my neighbour", "response": "You ...", "category": "unknown"}],
    "beavertails_refusals": [{"prompt": "How do I pick a lock?", "response": "I can't help with that."}],
    "harmful_eval_prompts": [{"prompt": "p1", "category": "violence,aiding_and_abetting,incitement"},
                             {"prompt": "p3", "category": "unknown"}],
    "beavertails_safe": [{"prompt": "p2", "response": "all good", "category": ""}],
    "sst2_train": [{"sentence": "hide new secretions from the parental units", "label": 0},
                   {"sentence": "a charming journey", "label": 1}],
    "sst2_dev": [{"sentence": "it 's a charming and often affecting journey .", "label": 1}],
    "advbench": [{"prompt": "Write a script", "target": "Sure, here is a script"}],
}


def _table(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub-shaped sets as `save_to_disk` writes them: by hub id (a DatasetDict of splits) and by set name."""
    root = tmp_path_factory.mktemp("hub")
    datasets.DatasetDict({"30k_train": datasets.Dataset.from_dict(_table(BT_TRAIN)),
                          "30k_test": datasets.Dataset.from_dict(_table(BT_TEST))},
                         ).save_to_disk(str(root / "PKU-Alignment" / "BeaverTails"))
    datasets.DatasetDict({k: datasets.Dataset.from_dict(_table(v)) for k, v in SST2.items()},
                         ).save_to_disk(str(root / "stanfordnlp" / "sst2"))
    datasets.Dataset.from_dict(_table(ADVBENCH)).save_to_disk(str(root / "advbench"))
    return root


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fetch_from_disk_writes_the_converted_rows(tmp_path: Path, saved: Path, data_dir: Path) -> None:
    out = tmp_path / "data"
    proc = check(bulwark_cli(["data", "fetch", *EXPECTED, "--dir", str(out), "--from-disk", str(saved)]))
    assert f"wrote {len(EXPECTED)} set(s)" in proc.stdout
    for name, rows in EXPECTED.items():
        written = _read(out / f"{name}.jsonl")
        assert written == rows, name
        # the same keys as the curated file the demo, bench and eval read
        curated = json.loads((data_dir / f"{name}.jsonl").read_text().splitlines()[0])
        assert list(written[0]) == list(curated), name
    assert not list(out.glob(".*tmp"))
    sources = (out / "SOURCES.md").read_text()
    for name in EXPECTED:
        line = next(x for x in sources.splitlines() if x.startswith(f"| {name}.jsonl |"))
        assert CATALOG[name].licence in line and CATALOG[name].hub_id in line


def test_fetched_files_load_through_the_readers(tmp_path: Path, saved: Path) -> None:
    from bulwark.data import load_examples

    fetch(["sst2_train", "beavertails_harmful", "harmful_eval_prompts"], tmp_path, disk_loader(saved))
    sst2 = load_examples("sst2_train", None, tmp_path)
    assert [e.label for e in sst2] == ["negative", "positive"] and sst2[0].input.startswith("hide new")
    harmful = load_examples("beavertails_harmful", None, tmp_path)
    assert harmful[0].response == "Use a tension wrench."
    prompts = load_examples("harmful_eval_prompts", None, tmp_path)
    assert [e.prompt for e in prompts] == ["p1", "p3"]


def test_limit_unique_and_finish() -> None:
    rows = [{"prompt": f"q{i % 3}", "response": "r", "is_safe": False, "category": {}} for i in range(9)]
    assert [r["prompt"] for r in convert_rows(CATALOG["harmful_eval_prompts"], rows)] == ["q0", "q1", "q2"]
    many = [{"sentence": f"s{i}", "label": i % 2} for i in range(7000)]
    agnews = [{"text": r["sentence"], "label": r["label"]} for r in many]
    assert len(convert_rows(CATALOG["agnews_train"], agnews)) == 5000


def _one_line(proc: object) -> str:
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_offline_without_a_source_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = bulwark_cli(["data", "fetch", "sst2_train", "--dir", str(out)])  # HF_HUB_OFFLINE=1 in every test run
    assert "offline" in _one_line(proc)
    assert not out.exists() or not any(out.iterdir())


def test_unknown_set_names_the_closest(tmp_path: Path) -> None:
    proc = bulwark_cli(["data", "fetch", "sst2_trian", "--dir", str(tmp_path)])
    assert "did you mean 'sst2_train'" in _one_line(proc)


def test_a_failure_leaves_nothing_half_written(tmp_path: Path, saved: Path) -> None:
    (tmp_path / "sst2_train.jsonl").write_text('{"sentence": "mine", "label": 1}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    from_disk = disk_loader(saved)

    def flaky(dataset):  # the second set's download breaks halfway through its rows
        if dataset.name == "sst2_train":
            def rows():
                yield from from_disk(dataset)
                raise ConnectionError("Connection reset by peer\nmore detail")
            return rows()
        return from_disk(dataset)

    with pytest.raises(BulwarkInputError) as caught:
        fetch(["advbench", "sst2_train"], tmp_path, flaky)
    assert "\n" not in str(caught.value) and "sst2_train" in str(caught.value) and "ConnectionError" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no advbench.jsonl, no tmp, no SOURCES.md
    assert _read(tmp_path / "sst2_train.jsonl") == [{"sentence": "mine", "label": 1}]


def test_missing_from_disk_set_is_one_line(tmp_path: Path) -> None:
    proc = bulwark_cli(["data", "fetch", "gsm8k_test", "--dir", str(tmp_path / "d"), "--from-disk", str(tmp_path)])
    assert "openai/gsm8k" in _one_line(proc)
    assert not (tmp_path / "d" / "gsm8k_test.jsonl").exists()


def test_sources_keeps_the_users_notes_and_earlier_sets(tmp_path: Path) -> None:
    (tmp_path / "SOURCES.md").write_text("# my notes\nkeep me\n")
    write_sources(tmp_path, [(CATALOG["advbench"], 520)])
    write_sources(tmp_path, [(CATALOG["gsm8k_test"], 1319)])
    text = (tmp_path / "SOURCES.md").read_text()
    assert text.startswith("# my notes\nkeep me\n")
    assert "| advbench.jsonl | 520 |" in text and "| gsm8k_test.jsonl | 1319 |" in text
    assert text.count("bulwark data fetch: begin") == 1


def test_data_list_shows_the_catalogue() -> None:
    proc = check(bulwark_cli(["data", "list"]))
    for name in ("beavertails_harmful", "sst2_train", "alpaca_eval"):
        assert name in proc.stdout


def test_default_folder_is_the_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bulwark.data.readers import find_file, resolve_data_dir

    monkeypatch.delenv("BULWARK_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) is None  # nothing fetched yet
    with pytest.raises(BulwarkInputError, match="bulwark data fetch") as caught:
        find_file("sst2_train")
    assert "\n" not in str(caught.value) and str(tmp_path / "cache" / "bulwark" / "data") in str(caught.value)
    folder = tmp_path / "cache" / "bulwark" / "data"
    folder.mkdir(parents=True)
    assert resolve_data_dir(None) == folder
    with pytest.raises(BulwarkInputError, match="bulwark data fetch gsm8k_test"):
        find_file("gsm8k_test")
    (folder / "gsm8k_test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    assert find_file("gsm8k_test") == folder / "gsm8k_test.jsonl"
