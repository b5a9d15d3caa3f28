"""tests/long_first.py: where the long tests go in the collection order for pytest-xdist."""
from long_first import order, share_sizes


def test_share_sizes_follow_worksteal():
    assert share_sizes(7, 2) == [3, 4]
    assert share_sizes(10, 3) == [3, 3, 4]
    assert share_sizes(5, 1) == [5]


def test_each_share_starts_with_its_long_tests_and_shorts_keep_their_order():
    minutes = {"aot": 12, "cmake": 3, "wheel": 2}
    items = ["s1", "cmake", "s2", "s3", "aot", "s4", "wheel", "s5", "s6", "s7"]
    out = order(items, lambda it: minutes.get(it, 0), workers=2)
    # shares of 5 and 5: aot alone on one worker, cmake and wheel (5 minutes) on the other
    assert out == ["aot", "s1", "s2", "s3", "s4", "cmake", "wheel", "s5", "s6", "s7"]
    assert order(items, lambda it: minutes.get(it, 0), workers=1)[:3] == ["aot", "cmake", "wheel"]


def test_more_long_tests_than_a_share_holds_loses_nothing():
    items = ["a", "b", "c", "s"]
    out = order(items, lambda it: {"a": 3, "b": 2, "c": 1}.get(it, 0), workers=2)
    assert sorted(out) == sorted(items) and out[0] == "a"
