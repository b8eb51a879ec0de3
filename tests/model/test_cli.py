"""`kvserve generate` end to end (in-process), and its clear error on bad input."""

from __future__ import annotations

import json

import pytest

from kvserve import LLM, SamplingParams
from kvserve.cli import main


def test_generate_prints_json_matching_the_python_api(ours, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nOnce upon a time\n")
    rc = main(
        [
            "generate",
            "--prompts-file",
            str(prompts),
            "--json",
            "--max-tokens",
            "6",
            "--dtype",
            "float32",
            "--num-kv-blocks",
            "64",
        ]
    )
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    expected = LLM(loaded=ours, dtype="float32", num_kv_blocks=64).generate(
        ["The capital of France is", "Once upon a time"], SamplingParams(temperature=0, max_tokens=6)
    )
    assert [d["token_ids"] for d in lines] == [o.outputs[0].token_ids for o in expected]


def test_generate_positional_prompt(ours, capsys):
    rc = main(["generate", "The capital of France is", "--json", "--max-tokens", "6", "--dtype", "float32",
               "--num-kv-blocks", "64"])  # fmt: skip
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    expected = LLM(loaded=ours, dtype="float32", num_kv_blocks=64).generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=6)
    )
    assert [d["token_ids"] for d in lines] == [expected[0].outputs[0].token_ids]


def test_generate_bad_config_exits_2_with_message(capsys):
    assert main(["generate", "hi", "--block-size", "12"]) == 2
    assert "block_size must be a power of two" in capsys.readouterr().err
    assert main(["generate", "hi", "--device", "tpu"]) == 2  # before any model is loaded
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["generate", "hi", "--temperature", "nan"]) == 2
    assert "temperature must be a finite number" in capsys.readouterr().err
    assert main(["generate", "--prompts-file", "/nonexistent/prompts.txt"]) == 2
    assert "cannot read --prompts-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: its own usage error, with parse_memory's message
        main(["generate", "hi", "--kv-cache-memory", "inf"])
    assert "cannot parse memory size 'inf'" in capsys.readouterr().err
