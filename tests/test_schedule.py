import math

import pytest

from psdclip.schedule import make_schedule


def test_linear_ramps_from_zero_to_alpha_max_over_the_run():
    schedule = make_schedule("linear", 0.5)
    assert [schedule(step, 101) for step in (0, 25, 50, 100, 150)] == [0.0, 0.125, 0.25, 0.5, 0.5]


def test_linear_with_explicit_ramp():
    schedule = make_schedule("linear", 0.4, start=10, end=30)
    assert schedule(0, 1000) == 0.0 and schedule(10, 1000) == 0.0
    assert math.isclose(schedule(20, 1000), 0.2) and schedule(30, 1000) == 0.4 and schedule(999, 1000) == 0.4


def test_cosine_is_a_half_cosine_ramp():
    schedule = make_schedule("cosine", 0.5, start=0, end=100)
    assert schedule(0, 1) == 0.0 and math.isclose(schedule(50, 1), 0.25) and math.isclose(schedule(100, 1), 0.5)
    assert math.isclose(schedule(25, 1), 0.5 * 0.5 * (1 - math.cos(math.pi / 4)))


def test_constant():
    schedule = make_schedule("constant", 0.3)
    assert {schedule(step, 10) for step in range(10)} == {0.3}


def test_single_step_run_reaches_alpha_max():
    assert make_schedule("linear", 0.5)(0, 1) == 0.5


def test_bad_ramp_refused():
    with pytest.raises(ValueError, match="ramp_start <= ramp_end"):
        make_schedule("linear", 0.5, start=10, end=5)


def test_ramp_points_given_as_fractions_of_the_run():
    schedule = make_schedule("linear", 0.4, start=0.5, end=0.75)
    assert schedule.bounds(101) == (50, 75) and schedule.bounds(1001) == (500, 750)
    assert schedule(49, 101) == 0.0 and math.isclose(schedule(60, 101), 0.16) and schedule(75, 101) == 0.4
    assert make_schedule("linear", 0.4, start=0.5).bounds(11) == (5, 10)  # no end: the last step
    assert make_schedule("linear", 0.4, start=10, end=0.5).bounds(101) == (10, 50)  # a step and a fraction


@pytest.mark.parametrize(
    "start,end,message",
    [
        (1.5, None, r"ramp_start=1.5: a float is a fraction of the training steps, in \[0, 1\]"),
        (0, -2, "ramp_end=-2: a step must be >= 0"),
        (0.8, 0.2, "ramp_start <= ramp_end"),
    ],
)
def test_bad_ramp_points_refused(start, end, message):
    with pytest.raises(ValueError, match=message):
        make_schedule("linear", 0.5, start=start, end=end)


def test_a_fraction_before_a_later_step_is_refused_once_the_run_length_is_known():
    with pytest.raises(ValueError, match="got steps 60 and 50 of 101"):
        make_schedule("linear", 0.5, start=60, end=0.5)(0, 101)
