"""--protocol, judge prompt files and the <think> opener: the run's start-up checks."""

from __future__ import annotations

import pytest

from experiments import run as run_cli
from experiments.config import JUDGE_MODEL, Settings
from experiments.rundir import RunError
from fcjax.protocol import PROTOCOLS, get_protocol
from fcjax.text.chat import open_think


@pytest.fixture
def parse_flags():
    """Parses experiments.run flags in-process; restores them afterwards."""
    flags = run_cli.FLAGS

    def parse(*args: str):
        flags.unparse_flags()
        flags(["run", "--out=/tmp/unused", *args])
        return run_cli.settings_from_flags()

    yield parse
    flags.unparse_flags()


def test_prompt_files_checked_at_start_up(parse_flags, tmp_path):
    bad = tmp_path / "judge.txt"
    bad.write_text("Rate each of these steps: {steps}")
    with pytest.raises(
        RunError, match=r"--decisiveness_prompt: .*judge.txt: missing placeholder \{n\}"
    ):
        parse_flags(f"--decisiveness_prompt={bad}")
    bad.write_text("Does {assertion} hold?")
    with pytest.raises(RunError, match=r"--consistency_prompt: .*missing placeholder \{context\}"):
        parse_flags(f"--consistency_prompt={bad}")
    with pytest.raises(RunError, match=r"no such prompt file"):
        parse_flags(f"--consistency_prompt={tmp_path / 'missing.txt'}")
    good = tmp_path / "good.txt"
    good.write_text("Is {assertion} consistent with {context}? Yes/No/N/A")
    assert parse_flags(f"--consistency_prompt={good}").consistency_prompt == str(good)


def test_protocol_flag_sets_every_published_behaviour(parse_flags):
    s = parse_flags(
        "--protocol=paper", "--system_intervention=ms_hedge", "--intervention=perception"
    )
    config = s.config()
    assert config["protocol"] == "paper" and config["cmfg_binning"] == "reference"
    proto = s.proto
    assert proto.answer_rule == "paper" and proto.numbered_choices and not proto.open_think
    assert (proto.scoring, proto.segmenter, proto.subset, proto.step_draw) == ("paper",) * 4
    assert proto.study_seed == 42 and proto.trajectory_closed == "right"
    assert proto.judges == "paper" and proto.prompt_style == "paper"
    assert config["system_intervention"] == "ms_hedge" and config["intervention"] == "perception"
    # an explicit flag overrides the protocol's choice
    assert parse_flags("--protocol=paper", "--cmfg_binning=closed").config()["cmfg_binning"] == (
        "closed"
    )
    plain = parse_flags().config()
    assert plain["protocol"] == "fcjax" and plain["cmfg_binning"] == "closed"
    assert plain["max_new_tokens"] == 20480
    with pytest.raises(RunError, match="both set the system prompt"):
        parse_flags("--intervention_role=system", "--system_intervention=ms_hedge")
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("other")
    assert set(PROTOCOLS) == {"fcjax", "paper"}


def test_judges_default_to_a_registry_model_never_the_studied_one():
    s = Settings(model="smollm2-135m-instruct")
    assert s.config()["judge_model"] == JUDGE_MODEL != s.model
    assert s.config()["decisiveness_judge"] == JUDGE_MODEL
    assert Settings(decisiveness="lexicon").config()["decisiveness_judge"] == "lexicon"
    assert Settings(decisiveness_model="x").config()["decisiveness_judge"] == "x"


class _Tok:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return self._vocab


def test_open_think_only_for_reasoning_models_without_it():
    reasoning = _Tok({"<think>": 5, "a": 1})
    assert open_think("<|im_start|>assistant\n", reasoning) == "<|im_start|>assistant\n<think>\n"
    opened = "<|im_start|>assistant\n<think>\n"
    assert open_think(opened, reasoning) == opened  # the template already opens it
    assert open_think("Assistant:", _Tok({"a": 1})) == "Assistant:"  # not a reasoning model


def test_paper_segmenter_replaces_only_the_default():
    paper, own = PROTOCOLS["paper"], PROTOCOLS["fcjax"]
    assert paper.split_method("paragraph") == "paper"
    assert paper.split_method("cue") == "cue" and paper.split_method("tokens") == "tokens"
    assert own.split_method("paragraph") == "paragraph"
