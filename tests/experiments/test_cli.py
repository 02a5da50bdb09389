"""The experiment CLI's usage errors and help texts (no training)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench import main as bench_main
from experiments.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_report_on_a_folder_without_results_is_a_usage_error(tmp_path, capsys):
    typo = tmp_path / "runs" / "reproduc"
    assert main(["report", "--out", str(typo)]) == 2
    assert "no results.jsonl" in capsys.readouterr().err
    assert not typo.exists()  # no empty report written into a new folder


def test_report_regenerates_from_rows(tmp_path):
    rows = (ROOT / "docs" / "results" / "reproduce-quick-before-study" / "results.jsonl").read_text().splitlines()
    # classify only: a quick end-to-end regeneration
    (tmp_path / "results.jsonl").write_text("\n".join(r for r in rows if json.loads(r)["task"] == "classify") + "\n")
    assert main(["report", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "Rows: classify: 300 steps, 3 seeds" in text and "t-interval" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reproduce", "--data", "foo"], "invalid choice: 'foo'"),
        (["reproduce", "--task", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_choices_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_study_is_a_usage_error(tmp_path, capsys):
    assert main(["reproduce", "--studies", "main,nope", "--out", str(tmp_path)]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err


def test_benchmark_sections_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--sections", "foo"])
    assert e.value.code == 2 and "unknown ['foo']" in capsys.readouterr().err


def test_help_shows_defaults_and_choices_without_rst():
    out = subprocess.run(
        [sys.executable, "-m", "experiments", "reproduce", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert "``" not in out
    assert "{auto,fashion,mnist}" in out and "(default: auto)" in out and "--threads" in out
    assert "runs/reproduce-quick" in out and "runs/reproduce-full" in out
    top = subprocess.run([sys.executable, "-m", "experiments", "--help"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "``" not in top
