"""``plaudit feedback import | export | stats`` on real HH lines and on TRL / ranking lines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from plaudit.cli import main
from plaudit.demo import HH_PAIRS

HH = HH_PAIRS


def write_lines(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_import_every_format_is_idempotent_and_reports_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ["--database-url", f"sqlite:///{tmp_path / 'fb.db'}", "--log-level", "WARNING"]
    source = write_lines(
        tmp_path / "mixed.jsonl",
        [
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: hello",
                "rejected": "\n\nHuman: hi\n\nAssistant: go away",
            },
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "annotator_id": "ann-7"},
            {
                "prompt": [{"role": "user", "content": "Capital of France?"}],
                "chosen": [{"role": "assistant", "content": "Paris"}],
                "rejected": [{"role": "assistant", "content": "Lyon"}],
            },
            {"prompt": "rank", "completions": ["best", "mid", "worst"]},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "completions": ["one"]},
            "not an object",
        ],
    )
    assert main(["feedback", "import", str(source), *db]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary == {"lines": 7, "accepted": 4, "duplicates": 0, "rejected": 3}
    assert "line 5: rejected" in captured.err and "line 6: completions" in captured.err
    assert "line 7:" in captured.err

    assert main(["feedback", "import", str(source), *db]) == 0  # again: nothing new
    assert json.loads(capsys.readouterr().out)["duplicates"] == 4

    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--out", str(out), *db]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 + 1 + 1 + 3
    assert {"prompt", "chosen", "rejected", "margin", "weight", "cursor"} <= set(rows[0])
    assert rows[0]["prompt"] == "\n\nHuman: hi\n\nAssistant:" and rows[0]["chosen"] == "hello"
    assert rows[1]["annotator_id"] == "ann-7"
    assert rows[2]["prompt"] == "\n\nHuman: Capital of France?\n\nAssistant:"
    assert "resume with --after-cursor" in capsys.readouterr().err

    resumed = tmp_path / "rest.jsonl"
    cursor = str(rows[2]["cursor"])
    assert main(["feedback", "export", "--out", str(resumed), "--after-cursor", cursor, *db]) == 0
    assert [json.loads(x) for x in resumed.read_text().splitlines()] == rows[3:]

    parquet = tmp_path / "pairs.parquet"
    assert main(["feedback", "export", "--format", "parquet", "--out", str(parquet), *db]) == 0
    table = pq.read_table(parquet)
    assert table.num_rows == 6 and table.column("chosen").to_pylist()[1] == "4"

    assert main(["feedback", "stats", "--json", *db]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 4 and stats["by_kind"] == {"comparison": 3, "ranking": 1}


@pytest.mark.skipif(not HH.is_file(), reason=f"shared HH data not found at {HH}")
def test_import_the_shared_hh_pairs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--database-url", f"sqlite:///{tmp_path / 'fb.db'}", "--log-level", "WARNING"]
    assert main(["feedback", "import", str(HH), *db]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lines"] == 1800
    assert summary["accepted"] + summary["rejected"] == 1800
    assert summary["rejected"] < 10  # a handful of HH lines have an empty completion
