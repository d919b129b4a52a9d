"""The report's evaluation table: each version's own worst class and group, labelled as such."""

import re

from explaind.client._neuroinspect import HeadEvaluation
from explaind.client.report import _evaluation_rows


def evaluation(classes: dict[str, float], groups: dict[str, float]) -> HeadEvaluation:
    worst_class = min(classes, key=classes.get)
    worst_group = min(groups, key=groups.get) if groups else ""
    return HeadEvaluation(accuracy=sum(classes.values()) / len(classes), class_accuracy=classes, worst_class=worst_class,
                          worst_class_accuracy=classes[worst_class], group_accuracy=groups, worst_group=worst_group,
                          worst_group_accuracy=groups.get(worst_group, float("nan")))


def table(html: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in (re.findall(r"<td>(.*?)</td>", row) for row in html.split("</tr>")) if cells}


def test_worst_rows_compare_each_versions_worst_and_name_both():
    before = evaluation({"circle": 0.825, "heart": 0.175}, {"heart|grass": 0.0, "circle|water": 0.125})
    after = evaluation({"circle": 0.800, "heart": 0.850}, {"heart|grass": 0.889, "circle|water": 0.0})
    rows = table(_evaluation_rows(before, after))
    assert rows["worst class (heart → circle)"] == ["0.175", "0.800", "0.625"]
    assert rows["worst group (heart|grass → circle|water)"] == ["0.000", "0.000", "0.000"]
    assert rows["group heart|grass"] == ["0.000", "0.889", "0.889"]
    assert rows["group circle|water"] == ["0.125", "0.000", "-0.125"]
    assert rows["class heart"] == ["0.175", "0.850", "0.675"]


def test_an_unchanged_worst_is_named_once_and_no_groups_means_no_group_rows():
    before = evaluation({"circle": 0.9, "heart": 0.2}, {})
    after = evaluation({"circle": 0.9, "heart": 0.5}, {})
    rows = table(_evaluation_rows(before, after))
    assert rows["worst class (heart)"] == ["0.200", "0.500", "0.300"]
    assert not [label for label in rows if "group" in label]
