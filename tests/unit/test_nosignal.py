"""The no-signal warning (cluster/driver/nosignal.py): once per streak of metrics.no_signal_steps steps without
learning signal, re-armed by a step with signal, naming the extract rate and the likely cause."""

import pytest

from cluster.driver.nosignal import CAUSES, LOW_EXTRACT, NoSignal, has_signal, likely_cause


def step(extracted: int, correct: int, *, signal: int = 0, responses: int = 32, groups: int = 8) -> dict:
    """One step's reward stats as reward/group.py reports them (gold-checked responses)."""
    return {"reward/responses": responses, "reward/extracted": extracted, "reward/extract_rate": extracted / responses,
            "reward/groups": groups, "reward/groups_with_signal": signal,
            "reward/gold_responses": responses, "reward/gold_correct": correct}


LEARNING = step(28, 12, signal=5)
FORMAT, HARD, EASY = step(1, 0), step(30, 0), step(32, 32)


def test_below_the_threshold_no_warning():
    ns = NoSignal(after=3)
    assert [ns.update(HARD) for _ in range(2)] == [None, None]
    assert ns.streak == 2 and ns.postfix() is None
    assert ns.stats() == {"no_signal/answer_format": 0.0, "no_signal/too_hard": 2.0, "no_signal/too_easy": 0.0}


def test_one_warning_per_streak_and_a_step_with_signal_rearms_it():
    ns = NoSignal(after=3)
    got = [ns.update(HARD) for _ in range(6)]
    assert [m is not None for m in got] == [False, False, True, False, False, False]
    assert ns.postfix() == "too hard (extract 94%)"            # stands on the progress bar meanwhile
    assert ns.update(LEARNING) is None
    assert ns.streak == 0 and ns.postfix() is None and set(ns.stats().values()) == {0.0}
    got = [ns.update(HARD) for _ in range(3)]
    assert [m is not None for m in got] == [False, False, True]


def test_the_three_causes_and_the_message():
    for stats, cause in ((FORMAT, "answer_format"), (HARD, "too_hard"), (EASY, "too_easy")):
        ns = NoSignal(after=2)
        assert ns.update(stats) is None
        msg = ns.update(stats)
        assert ns.cause == cause and ns.stats()[f"no_signal/{cause}"] == 2
        assert "\n" not in msg and msg.startswith("no learning signal for 2 steps in a row")
        assert f"{stats['reward/extract_rate']:.0%} of responses had an extractable answer (extract rate)" in msg
        assert "0 of 16 groups had rewards that differ" in msg
    assert "answer format" in NoSignal(1).update(FORMAT) and "too hard" in NoSignal(1).update(HARD)
    assert "too easy" in NoSignal(1).update(EASY)


def test_almost_no_answers_is_no_signal_even_with_a_group_that_differs():
    few = step(2, 1, signal=1)
    assert not has_signal(few) and has_signal(LEARNING)
    ns = NoSignal(after=1)
    assert "answer format" in ns.update(few) and ns.postfix() == "answer format (extract 6%)"


def test_cause_from_the_whole_streak_and_ttrl_uses_the_vote():
    assert likely_cause(LOW_EXTRACT - 0.01, 1.0) == "answer_format"
    assert likely_cause(LOW_EXTRACT, 0.5) == "too_hard" and likely_cause(0.9, 0.51) == "too_easy"
    ns = NoSignal(after=3)
    for st in (EASY, HARD, HARD):
        ns.update(st)
    assert ns.cause == "too_hard" and ns.right_rate == pytest.approx(32 / 96)
    # TTRL: unanimous votes are rewarded whatever the gold answer says
    ns = NoSignal(after=1)
    assert "too easy" in ns.update({**HARD, "ttrl/votes": 32, "ttrl/majority_votes": 32})
    assert ns.cause == "too_easy"


def test_a_step_that_graded_nothing_changes_nothing():
    ns = NoSignal(after=2)
    ns.update(HARD)
    assert ns.update({}) is None and ns.streak == 1


def test_every_cause_is_an_exported_key():
    from cluster.observe.metrics import STEP_STATS

    assert {f"no_signal/{c}" for c in CAUSES} <= set(STEP_STATS)
    assert "reward/extract_rate" in STEP_STATS
