"""`python -m app.transcribe` end to end: a subprocess per output format, on the real tiny.en engine.

All the command lines are started together (each on one torch thread) and their outputs shared by
the tests of this module. The text run is greedy (the cheapest decode): it checks the plain output
and the exit status when one of the files is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from app import transcribe as transcribe_cli
from app.errors import EngineError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIR = REPO_ROOT / "engines" / "tiny.en"
CLIP = "tests/data/jfk-inaugural-1961-excerpt.flac"
CLIP_DURATION = 11.0
REFERENCE = ("And so, my fellow Americans, ask not what your country can do for you, "
             "ask what you can do for your country.")
MISSING = "tests/data/no-such-file.flac"
NORMALIZE = EnglishTextNormalizer()

SRT_TIME = r"(\d{2}):(\d{2}):(\d{2}),(\d{3})"
VTT_TIME = r"(\d{2}):(\d{2}):(\d{2})\.(\d{3})"


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


#: 8 decoder rows are plenty for one file (beam 5) and spare each process ~0.5 GB of caches
COMMON = ["--model-dir", str(ENGINE_DIR), "--max-batch-size", "8"]
COMMANDS: dict[str, list[str]] = {
    "json": [*COMMON, "--format", "json", CLIP],
    "srt": [*COMMON, "--format", "srt", CLIP],
    "vtt": [*COMMON, "--format", "vtt", CLIP],
    # a missing file next to a good one: the good one is still transcribed, the exit status is 1
    "text+missing": [*COMMON, "--format", "text", "--greedy", CLIP, MISSING],
}


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    if not (ENGINE_DIR / "config.json").is_file():
        pytest.skip(f"{ENGINE_DIR} is missing: build it with `python build_engines.py`")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    processes = {
        name: subprocess.Popen([sys.executable, "-m", "app.transcribe", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in COMMANDS.items()
    }
    out = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=240)
            out[name] = Run(process.returncode, stdout, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return out


def seconds(match: tuple[str, ...]) -> float:
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_cues(blocks: list[str], time_pattern: str, numbered: bool) -> list[tuple[float, float, str]]:
    timing = re.compile(rf"^{time_pattern} --> {time_pattern}$")
    cues = []
    for index, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        if numbered:
            assert lines[0] == str(index), block
            lines = lines[1:]
        match = timing.match(lines[0])
        assert match, f"bad timing line {lines[0]!r}"
        start, end = seconds(match.groups()[:4]), seconds(match.groups()[4:])
        text = "\n".join(lines[1:])
        assert text.strip() and text == text.strip(), block
        assert "-->" not in text
        cues.append((start, end, text))
    return cues


def json_result(runs: dict[str, Run]) -> dict:
    run = runs["json"]
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object per file, one line each
    return json.loads(lines[0])


def assert_cues_match_segments(cues: list[tuple[float, float, str]], segments: list[dict]) -> None:
    assert [c[2] for c in cues] == [s["text"].strip() for s in segments]
    for (start, end, _), segment in zip(cues, segments, strict=True):
        assert start == pytest.approx(segment["start"], abs=1e-3)
        assert end == pytest.approx(segment["end"], abs=1e-3)
    for (start, end, _), (next_start, _, _) in zip(cues, cues[1:], strict=False):
        assert start < end <= next_start
    assert cues[0][0] >= 0.0 and cues[-1][1] <= CLIP_DURATION + 0.5


def test_json(runs: dict[str, Run]) -> None:
    obj = json_result(runs)
    assert set(obj) == {"file", "text", "language", "duration", "segments"}
    assert obj["file"] == CLIP and obj["language"] == "en"
    assert obj["duration"] == pytest.approx(CLIP_DURATION, abs=0.01)
    assert NORMALIZE(obj["text"]) == NORMALIZE(REFERENCE)
    segments = obj["segments"]
    assert segments and "".join(s["text"] for s in segments).strip() == obj["text"]
    for i, s in enumerate(segments):
        assert s["id"] == i and 0 <= s["start"] < s["end"]
        assert {"tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob"} <= set(s)


def test_text_and_a_missing_file(runs: dict[str, Run]) -> None:
    run = runs["text+missing"]
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and NORMALIZE(lines[0]) == NORMALIZE(REFERENCE)  # the good file
    errors = [line for line in run.stderr.splitlines() if line.startswith(MISSING)]
    assert len(errors) == 1 and "error" in errors[0]
    assert "Traceback" not in run.stderr


def test_srt(runs: dict[str, Run]) -> None:
    run = runs["srt"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n\n")
    blocks = run.stdout.strip("\n").split("\n\n")
    cues = parse_cues(blocks, SRT_TIME, numbered=True)
    assert_cues_match_segments(cues, json_result(runs)["segments"])


def test_vtt(runs: dict[str, Run]) -> None:
    run = runs["vtt"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("WEBVTT\n\n")
    blocks = run.stdout[len("WEBVTT\n\n"):].strip("\n").split("\n\n")
    cues = parse_cues(blocks, VTT_TIME, numbered=False)
    assert_cues_match_segments(cues, json_result(runs)["segments"])


def test_missing_engine_fails_with_the_build_hint(tmp_path: Path) -> None:
    # in-process: the engine is looked up before anything else happens
    with pytest.raises(EngineError, match="build_engines.py"):
        transcribe_cli.main(["--model-dir", str(tmp_path / "no-such-engine"), CLIP])
