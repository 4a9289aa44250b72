"""Template filters of the score pages (runs/templatetags/run_tags.py): numbers that do not flatter."""

from runs.templatetags.run_tags import delta_class, signed, verdict_class


def test_a_difference_that_rounds_to_nothing_has_no_sign():
    assert signed(-0.00001) == "0.0000" and signed(0.0) == "0.0000" and signed(None) == ""
    assert signed(0.0242) == "+0.0242" and signed(-0.013) == "-0.0130"


def test_only_a_verdict_of_the_paired_test_is_coloured():
    assert verdict_class("better") == "delta-pos" and verdict_class("worse") == "delta-neg"
    assert verdict_class("no significant difference") == verdict_class("too few pairs") == verdict_class("") == verdict_class(None) == ""
    assert delta_class(0.0242) == delta_class(-0.0001) == ""  # a bare difference, whatever its sign
