"""Mistake-neuron ranking: ratios, cut, both lists, importance, and a planted spurious neuron."""

import itertools
import math
import weakref

import pytest
import torch

from conftest import on_the_decision_boundary
from explaind.methods.neuroinspect import _ranking
from explaind.methods.neuroinspect import (
    CounterfactualSolution,
    MistakeNeuronRanker,
    neuron_importance,
    probability_ratio,
)

# Four mistakes with hand-written ω (D = 8): per sample, top-2 positive and top-2 negative.
OMEGA = torch.tensor([
    [3.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0],  # insufficient {0, 1}, excessive {4}
    [3.0, 0.0, 2.0, 0.0, 0.0, -2.0, -1.0, 0.0],  # insufficient {0, 2}, excessive {5, 6}
    [0.0, 0.0, 0.0, 1.0, 0.0, -3.0, 0.0, 0.0],  # insufficient {3}, excessive {5}
    [1.0, -5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],  # insufficient {7, 0}, excessive {1}
])


class FixedShifts:
    """A solver double returning OMEGA, to test the ranking on its own."""

    name = "fixed"

    def solve(self, weight, bias, features, labels, *, l1, l2, max_iterations, callback_on_step_end=None):
        n = len(features)
        return CounterfactualSolution(OMEGA[:n], torch.ones(n, dtype=torch.bool), torch.full((n,), 7))


def always_wrong_head(dim=8):
    head = torch.nn.Linear(dim, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 10.0]))  # always predicts class 1
    return head


def test_rank_ratios_cut_and_both_lists():
    ranker = MistakeNeuronRanker(always_wrong_head())
    features, labels = torch.rand(4, 8), torch.zeros(4, dtype=torch.long)
    ranking = ranker.rank(features, labels, solver=FixedShifts(), top_k=2, cut_ratio=0.2)
    by_id = {n.neuron: n for n in ranking.neurons}
    assert ranking.num_mistakes == 4 and ranking.num_converged == 4 and ranking.target_class == 0
    assert by_id[0].insufficient_ratio == 0.75 and by_id[0].direction == "insufficient"
    assert by_id[5].excessive_ratio == 0.5 and by_id[5].direction == "excessive"
    # Neuron 1 is in sample 0's insufficient and sample 3's excessive top-2: reported once.
    assert by_id[1].direction == "both" and (by_id[1].insufficient_ratio, by_id[1].excessive_ratio) == (0.25, 0.25)
    # Its rank ratio is the larger of the two shares, not their sum (it is in a quarter of the top-2s each way).
    assert (by_id[0].rank_ratio, by_id[1].rank_ratio) == (0.75, 0.25)
    assert ranking.neuron_ids[:2] == [0, 5] and sorted(ranking.neuron_ids) == [0, 1, 2, 3, 4, 5, 6, 7]
    # The rest tie at a quarter: by |mean ω| (1's −3/4 before 2's and 7's 1/2), then by id.
    assert ranking.neuron_ids == [0, 5, 1, 2, 7, 3, 4, 6]
    assert [n.neuron for n in ranking.insufficient] == [0, 1, 2, 7, 3]  # ties by |mean ω|
    assert [n.neuron for n in ranking.excessive] == [5, 1, 4, 6]
    assert by_id[0].mean_omega == pytest.approx(7 / 4)
    assert by_id[1].mean_omega == pytest.approx(-3 / 4)  # signed: +2 in sample 0, −5 in sample 3
    # Sample 2 has a single positive ω: its second insufficient slot is empty.
    assert ranking.insufficient_top[2].tolist() == [3, -1]

    strict = ranker.rank(features, labels, solver=FixedShifts(), top_k=2, cut_ratio=0.3)
    assert strict.neuron_ids == [0, 5]
    # A ratio equal to the cut stays, in either list: 2, 3 and 7 are insufficient in a
    # quarter of the mistakes, 4 and 6 excessive in a quarter, 1 both.
    assert sorted(ranker.rank(features, labels, solver=FixedShifts(), top_k=2, cut_ratio=0.25).neuron_ids) == list(range(8))
    # A cut of 0 keeps every neuron in some mistake's top-k, and only those: in a top-1,
    # neurons 2 and 6 never come first in either direction.
    assert sorted(ranker.rank(features, labels, solver=FixedShifts(), top_k=1, cut_ratio=0).neuron_ids) == [0, 1, 3, 4, 5, 7]


class ShiftsWithOneMoreMistake(FixedShifts):
    """OMEGA and a fifth mistake that needs no neuron lowered (no ω < 0)."""

    def solve(self, weight, bias, features, labels, *, l1, l2, max_iterations, callback_on_step_end=None):
        omega = torch.cat([OMEGA, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]])])
        return CounterfactualSolution(omega, torch.ones(5, dtype=torch.bool), torch.full((5,), 7))


def test_ratios_are_shares_of_all_mistakes_not_of_those_with_a_neuron_in_that_direction():
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(torch.rand(5, 8), torch.zeros(5, dtype=torch.long),
                                                            solver=ShiftsWithOneMoreMistake(), top_k=2, cut_ratio=0)
    by_id = {n.neuron: n for n in ranking.neurons}
    assert by_id[5].excessive_ratio == pytest.approx(2 / 5) and by_id[7].insufficient_ratio == pytest.approx(2 / 5)


def test_ratios_are_shares_of_the_mistakes_not_of_every_sample_given():
    # Samples the head gets right (labelled 1, which it always predicts) are not explained
    # and do not dilute the shares: the same four mistakes as above, among six samples.
    labels = torch.tensor([0, 1, 0, 0, 1, 0])
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(torch.rand(6, 8), labels, solver=FixedShifts(), top_k=2, cut_ratio=0)
    by_id = {n.neuron: n for n in ranking.neurons}
    assert ranking.num_mistakes == 4 and ranking.num_samples == 6
    assert (by_id[0].insufficient_ratio, by_id[5].excessive_ratio) == (0.75, 0.5)


def test_a_neuron_s_top_classes_weigh_it_most_not_most_in_size():
    """The paper conditions on "the classes with the highest β for the neuron": a class
    weighing it strongly negatively is one the neuron argues against, not for."""
    head = torch.nn.Linear(8, 5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.0, -5.0, 2.0, 0.5, 0.0]).unsqueeze(1).expand(5, 8) * 1e-3)
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))  # always predicts class 4
    ranking = MistakeNeuronRanker(head).rank(torch.rand(4, 8), torch.zeros(4, dtype=torch.long), solver=FixedShifts(), top_k=2)
    assert {n.top_classes for n in ranking.neurons} == {(2, 0, 3)}


class TiedShifts(FixedShifts):
    """Two mistakes whose ω ties: neurons 3, 4 and 6 are equally insufficient for the first
    and equally excessive for the second (as neurons of equal head columns are)."""

    def solve(self, weight, bias, features, labels, *, l1, l2, max_iterations, callback_on_step_end=None):
        tied = torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0, 1.0, 2.0, 0.0])
        return CounterfactualSolution(torch.stack([tied, -tied]), torch.ones(2, dtype=torch.bool), torch.full((2,), 7))


def test_equal_shifts_are_taken_by_neuron_id():
    ranker = MistakeNeuronRanker(always_wrong_head())
    features, labels = torch.rand(2, 8), torch.zeros(2, dtype=torch.long)
    ranking = ranker.rank(features, labels, solver=TiedShifts(), top_k=2, cut_ratio=0)
    assert ranking.insufficient_top.tolist() == [[3, 4], [-1, -1]] and ranking.excessive_top.tolist() == [[-1, -1], [3, 4]]
    assert ranking.neuron_ids == [3, 4]  # 6 ties them but comes after them
    # Within a mistake's top-k too, equal shifts are listed by id, the larger shift first.
    assert ranker.rank(features, labels, solver=TiedShifts(), top_k=4).insufficient_top[0].tolist() == [3, 4, 6, 5]
    # A neuron's top classes too: every class weighs these neurons 0 (topk took 2, 4, 3).
    head = torch.nn.Linear(8, 5)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))  # always predicts class 4
    ranking = MistakeNeuronRanker(head).rank(features, labels, solver=TiedShifts(), top_k=2, cut_ratio=0)
    assert [n.top_classes for n in ranking.neurons] == [(0, 1, 2)] * 2


# top_ids' ways to its answer, each forced by its module constants (the rule picks by k,
# the call's size and whether topk's k + 1 tie): they must give the same ids in the same
# order, so which one the rule picks is a matter of time alone.
TOP_IDS_STRATEGIES = {
    "as the rule picks": {},
    "whole rows sorted": {"FULL_SORT_SHARE": 10**9},
    "topk, its ties ordered": {"FULL_SORT_SHARE": 0, "SORTED_CALL_SCORES": 0, "TIED_CALL_SORTED_SCORES": 0},
    "topk, whole rows sorted where it ties": {"FULL_SORT_SHARE": 0, "SORTED_CALL_SCORES": 0, "TIED_CALL_SORTED_SCORES": 10**9},
}


@pytest.fixture(params=list(TOP_IDS_STRATEGIES))
def top_ids_strategy(request, monkeypatch):
    """Forces top_ids down one way (TOP_IDS_STRATEGIES) for the test."""
    for name, value in TOP_IDS_STRATEGIES[request.param].items():
        monkeypatch.setattr(_ranking, name, value)
    return request.param


def test_top_ids_are_the_largest_scores_then_the_smallest_ids_whatever_k_and_ties(top_ids_strategy):
    # Checked against a plain sort by (-score, id): a tie where the k-th score meets the
    # next one (k = n - 1 included), more than 16 equal scores (where an unstable sort
    # reorders them), -0.0 beside 0.0, k = 1 and k = n, and rows of one value.
    from explaind.methods.neuroinspect._ranking import top_ids

    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4, 7, 20, 40):
        scores = torch.randint(-1, 2, (6, n), generator=generator).float()
        scores[0] = 1.0
        scores[1, ::2] = -0.0
        for k in sorted({1, max(n - 1, 1), n, (n + 1) // 2}):
            values, ids = top_ids(scores, k)
            expected = [sorted(range(n), key=lambda i: (-row[i], i))[:k] for row in scores.tolist()]
            assert ids.tolist() == expected, (n, k)
            assert torch.equal(values, scores.gather(1, ids))
            # Each row alone too: whether ties are looked for holds for the whole batch, and
            # another row's ties hid a row whose only tie is its k-th score with the next.
            assert [top_ids(row.unsqueeze(0), k)[1][0].tolist() for row in scores] == expected, (n, k)
    # NaN, which topk takes as the largest, beside a tie that k cuts: the tie filled the k
    # places left without the NaNs, fewer than k ids for the row, and failed reshaping them.
    nan = math.nan
    values, ids = top_ids(torch.tensor([[0.5, 0.5, nan, nan, 0.1, 0.2]]), 3)
    assert ids.tolist() == [[2, 3, 0]] and values[0, 2] == 0.5 and values[0, :2].isnan().all()
    # NaNs with no tie among the numbers: they were left in topk's order (3, 5, 4 for a k of
    # 3 below) while a tie in another row of the batch put them in id order, so a Predict
    # answered an image of NaN probabilities by which requests shared its batch. NaNs tie
    # with each other: the first by id, first.
    tied = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    for row in ([0.1, 0.2, nan, nan, nan, nan], [0.1, 0.2, nan, nan, 0.5, nan], [nan, 0.3, nan, 0.2, nan, 0.1]):
        expected = sorted(range(6), key=lambda i: (not math.isnan(row[i]), 0.0 if math.isnan(row[i]) else -row[i], i))
        for k in range(1, 7):
            alone, batched = top_ids(torch.tensor([row]), k)[1][0], top_ids(torch.stack([torch.tensor(row), tied]), k)[1][0]
            assert alone.tolist() == batched.tolist() == expected[:k], (row, k)
    # -inf ties too (a Predict's classes a model masks): they were left in topk's order,
    # which took ids 4 and 5 for the last places of a top 4 below.
    inf = math.inf
    for row in ([0.0, 1.0, -inf, -inf, -inf, -inf], [-inf] * 8):
        expected = sorted(range(len(row)), key=lambda i: (-row[i], i))
        for k in range(1, len(row) + 1):
            assert top_ids(torch.tensor([row]), k)[1][0].tolist() == expected[:k], (row, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_a_nan_of_either_sign_ranks_above_every_number_each_way(top_ids_strategy):
    # CUDA's radix sort orders NaN by its bits: one with the sign bit set (0 * -inf's, a
    # negated NaN ω) went below -inf in a descending sort of rows past 128 scores, where
    # topk and the CPU put it first.
    from explaind.methods.neuroinspect._ranking import top_ids

    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 300, generator=generator)
    negative_nan = torch.tensor(math.nan).neg()
    assert torch.signbit(negative_nan)
    scores[0, 7] = negative_nan
    scores[1, [5, 250]] = torch.stack([negative_nan, torch.tensor(math.nan)])
    scores[2, 100] = -math.inf
    scores[2, 299] = negative_nan
    for k in (1, 3, 150, 300):
        expected = [_ranked_by_score_then_id(row)[:k] for row in scores.tolist()]
        assert top_ids(scores, k)[1].tolist() == expected, k
        assert top_ids(scores.cuda(), k)[1].cpu().tolist() == expected, k


def _ranked_by_score_then_id(row: list[float]) -> list[int]:
    """A row's ids by score, largest first (NaN above every number, NaNs tied), equal ones by id."""
    return sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]), 0.0 if math.isnan(row[i]) else -row[i], i))


def test_top_ids_and_top_neurons_match_a_plain_sort_for_every_k_ties_nan_and_infinities(top_ids_strategy):
    # Every k of 1..n (past n too), each way forced and as the rule picks, on rows of few
    # distinct values (ties at the k-th score, runs of more than 16 equal scores), mostly
    # zeros (the proximal solver's ω), -0.0, NaN, ±inf, in float32 and float16 (whose
    # normal scores tie where float32's do not).
    from explaind.methods.neuroinspect._ranking import _top_neurons, top_ids

    generator = torch.Generator().manual_seed(1)
    palette = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.0, -1.0, math.nan, math.inf, -math.inf])
    for n, dtype, zeros in itertools.product((1, 2, 5, 9, 24, 61), (torch.float32, torch.float16), (0.0, 0.9)):
        scores = palette[torch.randint(len(palette), (7, n), generator=generator)]
        scores[torch.rand(7, n, generator=generator) < zeros] = 0.0
        scores[0] = torch.randn(n, generator=generator)  # no tie (in float32)
        scores[1] = 0.0
        scores = scores.to(dtype)
        ranked = [_ranked_by_score_then_id(row) for row in scores.tolist()]
        for k in range(1, n + 2):
            expected = [order[:k] for order in ranked]
            values, ids = top_ids(scores, k)
            assert ids.tolist() == expected, (n, dtype, zeros, k)
            assert torch.equal(values.nan_to_num(7.0), scores.gather(1, ids).nan_to_num(7.0))
            positive = [[i if not (row[i] <= 0.0) and not math.isnan(row[i]) else -1 for i in top] for row, top in zip(scores.tolist(), expected)]
            assert _top_neurons(scores, k).tolist() == positive, (n, dtype, zeros, k)
            # Ties at or below ties_kept_above may take any of the tied ids: the same
            # values, the same ids above it, and ids of a tie listed by id.
            values, ids = top_ids(scores, k, ties_kept_above=0.0)
            reference = scores.gather(1, torch.tensor(expected))
            assert torch.equal(values.nan_to_num(7.0), reference.nan_to_num(7.0)), (n, dtype, zeros, k)
            kept = (values > 0) | values.isnan()
            assert torch.equal(ids[kept], torch.tensor(expected)[kept]), (n, dtype, zeros, k)
            assert all(len(set(row)) == len(row) for row in ids.tolist())
            assert torch.equal(scores.gather(1, ids).nan_to_num(7.0), values.nan_to_num(7.0))
            tied_next = (values[:, 1:] == values[:, :-1]) | (values[:, 1:].isnan() & values[:, :-1].isnan())
            assert (ids[:, 1:] > ids[:, :-1])[tied_next].all(), (n, dtype, zeros, k)


def test_top_ids_of_a_large_k_sort_whole_rows_and_hold_only_k_columns():
    from explaind.methods.neuroinspect._ranking import top_ids

    generator = torch.Generator().manual_seed(1)
    # A large k of a wide row (Predict's top classes of 21k) holds k columns, not the row's sort.
    values, ids = top_ids(torch.randn(4, 3000, generator=generator), 1000)
    assert ids.untyped_storage().nbytes() == 4 * 1000 * 8 and values.untyped_storage().nbytes() == 4 * 1000 * 4
    # What a large k is depends on the row's length alone, not on how many rows: a batch
    # of 200 of 6 classes (above a small call's size), k = 2, is sorted whole (topk's
    # columns would be k + 1).
    assert 200 * 6 > _ranking.SORTED_CALL_SCORES
    values, ids = top_ids(torch.randn(200, 6, generator=generator), 2)
    assert ids.untyped_storage().nbytes() == 200 * 2 * 8 and values.untyped_storage().nbytes() == 200 * 2 * 4


def test_top_neurons_of_a_large_k_select_only_as_many_places_as_a_row_has_positive_or_nan_scores(monkeypatch):
    # The proximal solver's ω is mostly exact zeros: a large k sorted every row whole for
    # places that can only be pads. Zeros and negatives are not selected, NaN is (it ranks
    # above every number); k * FULL_SORT_SHARE == D is a large k. No rows: no places.
    asked = []
    real_top_ids = _ranking.top_ids
    monkeypatch.setattr(_ranking, "top_ids", lambda scores, k, **kwargs: asked.append(k) or real_top_ids(scores, k, **kwargs))
    nan = math.nan
    scores = torch.tensor([[0.0, 2.0, 0.0, -1.0, 0.0, 3.0, 0.0, 0.0, -0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, nan, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, -2.0, 0.0],
                           [-1.0, -2.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    k = scores.shape[1] // _ranking.FULL_SORT_SHARE
    assert _ranking._top_neurons(scores, k).tolist() == [[5, 1, -1, -1], [-1, 4, 7, -1], [11, -1, -1, -1]]
    assert asked == [3]  # row 1's NaN (a -1 in its place) and two positive scores
    assert _ranking._top_neurons(torch.empty(0, 12), k).shape == (0, k)
    # So does a k of D / POSITIVES_COUNTED_SHARE, below D / FULL_SORT_SHARE: topk of k + 1
    # and its tied zeros took 1.5 times the count and a topk of the few positive ones.
    asked.clear()
    wide = torch.zeros(3, 2 * _ranking.POSITIVES_COUNTED_SHARE)
    wide[0, 7], wide[1, 3], wide[2, -2] = 1.0, -1.0, nan
    k = wide.shape[1] // _ranking.POSITIVES_COUNTED_SHARE
    assert k * _ranking.FULL_SORT_SHARE < wide.shape[1]
    assert _ranking._top_neurons(wide, k).tolist() == [[7, -1], [-1, -1], [-1, -1]]
    assert asked == [1]


def test_only_mistakes_of_the_target_class_are_explained():
    ranker = MistakeNeuronRanker(always_wrong_head())
    labels = torch.tensor([0, 1, 0, 1])  # samples 1 and 3 are predicted correctly
    ranking = ranker.rank(torch.rand(4, 8), labels, solver=FixedShifts(), top_k=2)
    assert ranking.mistake_indices.tolist() == [0, 2] and ranking.omega.shape == (2, 8)
    none = ranker.rank(torch.rand(4, 8), labels, solver=FixedShifts(), target_class=1)
    assert none.num_mistakes == 0 and none.neurons == [] and none.target_class == 1
    # A class no sample has: nothing to explain either (its mean feature would be NaN).
    absent = MistakeNeuronRanker(torch.nn.Linear(8, 3)).rank(torch.rand(4, 8), labels, solver=FixedShifts(), target_class=2)
    assert absent.num_mistakes == 0 and absent.neurons == [] and absent.target_class == 2


def test_with_a_target_class_only_its_samples_are_predicted(monkeypatch):
    """A set's other classes need no (N, C) logits: their mistakes are not explained."""
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 3)
    features, labels = torch.randn(12, 8, generator=generator), torch.tensor([0, 1, 2, 2, 1, 0, 2, 1, 1, 0, 1, 1])
    predicted = (features @ head.weight.detach().T + head.bias.detach()).argmax(1)
    predicted_rows: list[int] = []
    predicted_classes = _ranking.predicted_classes

    def recording(weight, bias, rows):
        predicted_rows.append(len(rows))
        return predicted_classes(weight, bias, rows)

    monkeypatch.setattr(_ranking, "predicted_classes", recording)
    ranker = MistakeNeuronRanker(head)
    for target_class, rows in ((2, 3), (1, 6), (None, 12)):
        predicted_rows.clear()
        ranking = ranker.rank(features, labels, solver=FixedShifts(), target_class=target_class)
        wrong = (predicted != labels) & ((labels == target_class) if target_class is not None else True)
        assert predicted_rows == [rows] and ranking.mistake_indices.tolist() == wrong.nonzero().squeeze(1).tolist()
    assert 0 < ranking.num_mistakes < 12


def test_a_sample_on_the_decision_boundary_is_a_mistake_as_the_head_module_classifies_it():
    # EvaluateSampleSet and Predict classify with the head module (nn.Linear's F.linear), and
    # the solvers judge a flip with it; features @ W.T + b rounds some samples on the boundary
    # to the other class, which the ranker explained as mistakes an evaluation counted right
    # (and the solver "flipped" at ω = 0), and an edit's evaluation counted wrong.
    from explaind.methods.neuroinspect import evaluate_head

    head, features = on_the_decision_boundary(4000)
    with torch.no_grad():
        labels = head(features).argmax(1)  # each sample right, as an evaluation counts
        if not ((features @ head.weight.T + head.bias).argmax(1) != labels).any():
            pytest.skip("this machine's addmm and matmul round the boundary alike")
    ranking = MistakeNeuronRanker(head).rank(features, labels, solver=FixedShifts())
    assert ranking.num_mistakes == 0
    assert evaluate_head(head.weight.detach(), head.bias.detach(), features, labels).accuracy == 1.0


def test_by_default_the_commonest_true_class_among_the_mistakes_is_explained_with_three_top_classes():
    # Most samples are of class 4 and predicted right: the class whose importance is
    # reported is that of most mistakes (0), not of most samples.
    head = torch.nn.Linear(8, 5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.0, 2.0, 4.0, 3.0, 0.0]).unsqueeze(1).expand(5, 8) * 1e-3)
        head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))  # always predicts class 4
    features = torch.rand(10, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([4, 4, 4, 0, 4, 0, 4, 2, 0, 4])
    ranking = MistakeNeuronRanker(head).rank(features, labels, solver=FixedShifts(), top_k=2)
    assert ranking.target_class == 0 and ranking.mistake_indices.tolist() == [3, 5, 7, 8]
    expected = neuron_importance(head.weight.detach(), head.bias.detach(), features[labels == 0].mean(0), 0)
    assert [n.importance for n in ranking.neurons] == pytest.approx(expected[ranking.neuron_ids].tolist())
    # Each neuron names the three classes weighing it most, largest first.
    assert {n.top_classes for n in ranking.neurons} == {(2, 3, 1)}
    # The commonest, not the first: two mistakes of class 2 against one of class 0.
    labels = torch.tensor([4, 2, 4, 2, 0, 4, 4, 4, 4, 4])
    assert MistakeNeuronRanker(head).rank(features, labels, solver=FixedShifts(), top_k=2).target_class == 2


def test_by_default_a_tie_between_the_commonest_classes_goes_to_the_smallest_whatever_the_samples_order():
    head = torch.nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))  # always predicts class 2
    features = torch.rand(4, 8)
    for labels in ([0, 1, 0, 1], [1, 0, 1, 0]):  # two mistakes of each class, either first
        assert MistakeNeuronRanker(head).rank(features, torch.tensor(labels), solver=FixedShifts()).target_class == 0


def test_neuron_importance_matches_zeroing_each_neuron():
    torch.manual_seed(0)
    weight, bias, feature = torch.randn(5, 12), torch.randn(5), torch.rand(12) * 3
    ratios = neuron_importance(weight, bias, feature, 2)
    for k in range(12):
        zeroed = feature.clone()
        zeroed[k] = 0
        expected = (weight @ feature + bias).softmax(0)[2] / (weight @ zeroed + bias).softmax(0)[2]
        assert ratios[k].item() == pytest.approx(expected.item(), rel=1e-4)
    # Eq. 7: a neuron weighted equally by every class leaves the probabilities unchanged.
    weight[:, 4] = 0.7
    assert neuron_importance(weight, bias, feature, 2)[4].item() == pytest.approx(1.0, abs=1e-5)


def test_probability_ratio_zeroes_the_neurons_together():
    torch.manual_seed(1)
    weight, bias, features = torch.randn(4, 10), torch.randn(4), torch.rand(6, 10)
    neurons = torch.tensor([1, 7])
    zeroed = features.clone()
    zeroed[:, neurons] = 0
    expected = (features @ weight.T + bias).softmax(1)[:, 3] / (zeroed @ weight.T + bias).softmax(1)[:, 3]
    torch.testing.assert_close(probability_ratio(weight, bias, features, 3, neurons), expected)


def test_probability_ratios_are_capped_at_1e15_instead_of_overflowing():
    # Both classes score 1000; zeroing neuron 0 drops class 0's score to 0, so the exact
    # ratio p_0 / p'_0 is e^1000 / 2, far beyond float32.
    weight = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 1000.0, 0.0]])
    bias, feature = torch.zeros(2), torch.tensor([1.0, 1.0, 0.0])
    ratio = probability_ratio(weight, bias, feature.unsqueeze(0), 0, torch.tensor([0]))
    importance = neuron_importance(weight, bias, feature, 0)
    assert ratio.item() == pytest.approx(1e15, rel=1e-3) and importance[0].item() == pytest.approx(1e15, rel=1e-3)
    assert importance[2].item() == pytest.approx(1.0)
    # The cap is trainable: its gradient is zero, not the NaN of a capped infinity (0 × e^1000).
    weight.requires_grad_(True)
    probability_ratio(weight, bias, feature.unsqueeze(0), 0, torch.tensor([0])).sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_probability_ratios_of_a_half_precision_head_stay_finite_up_to_the_cap():
    # Zeroing neuron 0 drops class 0's score from 20 to 0 against class 1's 15: a ratio of
    # about e^15 = 3.3e6, past float16's 65504, which came back infinite for a float16 head
    # (an "auto" target ratio of infinity then made the edit's penalty infinite).
    weight, bias, feature = torch.tensor([[20.0, 0.0], [0.0, 0.0]]), torch.tensor([0.0, 15.0]), torch.tensor([1.0, 0.0])
    expected = neuron_importance(weight, bias, feature, 0)
    for dtype in (torch.float16, torch.bfloat16):
        importance = neuron_importance(weight.to(dtype), bias.to(dtype), feature, 0)
        ratio = probability_ratio(weight.to(dtype), bias.to(dtype), feature.unsqueeze(0), 0, torch.tensor([0]))
        assert torch.isfinite(importance).all() and torch.isfinite(ratio).all(), dtype
        torch.testing.assert_close(importance.float(), expected, rtol=2e-2, atol=0)
        torch.testing.assert_close(ratio.float(), expected[:1], rtol=2e-2, atol=0)


def planted_problem(seed=0, n=400, dim=16):
    """Class 0 was learnt with spurious neuron 9: its class-0 samples that lack it are mistakes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    features = torch.rand(n, dim, generator=g) * 0.3
    features[torch.arange(n), labels] += 1.0  # core neuron c for class c
    features[:, 9] = (torch.rand(n, generator=g) < 0.5).float() * 1.5  # background, unrelated in test
    head = torch.nn.Linear(dim, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[[0, 1, 2], [0, 1, 2]] = 1.0
        head.weight[0, 0] = 0.5
        head.weight[0, 9] = 2.0  # class 0 leans on neuron 9
        head.bias.copy_(torch.tensor([-0.5, 0.0, 0.0]))
    return head, features, labels


@pytest.mark.parametrize("solver", ["faithful", "proximal"])
def test_planted_spurious_neuron_ranks_first_for_its_class(solver):
    head, features, labels = planted_problem()
    ranking = MistakeNeuronRanker(head).rank(features, labels, solver=solver, target_class=0)
    class0 = labels == 0
    lacking = class0 & (features[:, 9] == 0)
    assert ranking.num_mistakes > 0.8 * int(lacking.sum()) and ranking.num_converged == ranking.num_mistakes
    assert set(ranking.mistake_indices.tolist()) <= set(lacking.nonzero().squeeze(1).tolist())
    top = ranking.neurons[0]
    assert top.neuron == 9 and top.direction in ("insufficient", "both") and top.insufficient_ratio == 1.0
    assert top.top_classes[0] == 0 and top.mean_omega > 0
    # Zeroing neuron 9 on the class-0 mean feature lowers p_0: importance well above 1.
    assert top.importance > 1.5
    expected = neuron_importance(head.weight.detach(), head.bias.detach(), features[class0].mean(0), 0)[9]
    assert top.importance == pytest.approx(expected.item())


def test_rank_reports_cancellation():
    head, features, labels = planted_problem()
    full = MistakeNeuronRanker(head).rank(features, labels)
    ranking = MistakeNeuronRanker(head).rank(features, labels, callback_on_step_end=lambda step, total, n: True)
    # Stopped after one step: only mistakes that one update flipped are converged.
    assert ranking.cancelled and (ranking.iterations <= 1).all()
    assert torch.equal(ranking.converged, full.converged & (full.iterations <= 1))
    assert not ranking.converged.all()
    assert ranking.num_converged == int(ranking.converged.sum()) < ranking.num_mistakes
    assert ranking.summary().endswith(f"{ranking.num_converged} of {ranking.num_mistakes} counterfactuals flipped the prediction")
    # A stopped solver draws no resamples (its ω half-solved): no stability, and none said to be cut short.
    stable = MistakeNeuronRanker(head).rank(features, labels, callback_on_step_end=lambda step, total, n: True, stability_resamples=100)
    assert stable.cancelled and (stable.stability_resamples, stable.stability_resamples_requested) == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"top_k": 0}, "top_k"), ({"cut_ratio": 1.5}, "cut_ratio"), ({"l1": -1.0}, "l1"),
     ({"target_class": 7}, "target_class"), ({"max_iterations": 0}, "max_iterations"),
     ({"class_mean_feature": torch.zeros(3)}, "class_mean_feature"),
     ({"stability_resamples": -1}, "stability_resamples"), ({"stability_resamples": 1001}, "stability_resamples")],
)
def test_bad_arguments_raise_value_errors_naming_the_field(kwargs, field):
    head, features, labels = planted_problem(n=30)
    with pytest.raises(ValueError, match=field):
        MistakeNeuronRanker(head).rank(features, labels, **kwargs)


def test_bad_shapes_raise_value_errors():
    head, features, labels = planted_problem(n=30)
    ranker = MistakeNeuronRanker(head)
    with pytest.raises(ValueError, match="features"):
        ranker.rank(features[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        ranker.rank(features, labels[:3])
    assert math.isfinite(ranker.rank(features, labels).neurons[0].importance)


class Cancelled(FixedShifts):
    """A solver (a caller's own) that reports it was cancelled, even with no samples to solve."""

    def solve(self, weight, bias, features, labels, *, l1, l2, max_iterations, callback_on_step_end=None):
        n = len(features)
        return CounterfactualSolution(OMEGA[:n], torch.ones(n, dtype=torch.bool), torch.full((n,), 7), cancelled=True)


def test_a_ranking_shows_as_its_summary_and_reads_as_the_sdks():
    # Its repr held every neuron and the mistake indices (5 kB on the shapes world) and it
    # had no summary() as the SDK's ranking has.
    from types import SimpleNamespace

    ranker = MistakeNeuronRanker(always_wrong_head())
    features, labels = torch.rand(4, 8), torch.zeros(4, dtype=torch.long)
    ranking = ranker.rank(features, labels, solver=FixedShifts(), top_k=2, cut_ratio=0.3)
    assert repr(ranking) == "NeuronRanking(target_class=0, solver='fixed', num_samples=4, cancelled=False)"
    assert ranking.summary().splitlines() == [
        "4 mistakes of class 0 in 4 samples; neurons ranked by share of mistakes in their top 2 (solver fixed):",
        "  neuron  direction     insufficient  excessive  importance  top classes",
        "       0  insufficient           75%         0%        1.00  0; 1",
        "       5  excessive               0%        50%        1.00  0; 1",
        "4 of 4 counterfactuals flipped the prediction",
    ]
    assert len(ranking.summary(limit=1).splitlines()) == 4 and ranking.summary(limit=0) == ranking.summary()
    # Mistakes, but no neuron passes the cut: said, not a heading ending in a colon over nothing.
    uncut = ranker.rank(features, labels, solver=FixedShifts(), top_k=2, cut_ratio=0.9)
    assert not uncut.neurons and uncut.summary().splitlines()[1:] == ["  none passed the cut ratio", "4 of 4 counterfactuals flipped the prediction"]
    shown: list[str] = []
    ranking._repr_pretty_(SimpleNamespace(text=shown.append), False)
    assert shown == [ranking.summary()]
    right = ranker.rank(features, torch.ones(4, dtype=torch.long), solver=FixedShifts(), top_k=2)
    assert right.summary() == "no mistakes of class 1 in 4 samples: nothing to explain"
    stopped = ranker.rank(features, torch.ones(4, dtype=torch.long), solver=Cancelled(), top_k=2)
    assert stopped.summary() == "no mistakes of class 1 in 4 samples: nothing to explain (cancelled: stopped early)"
    # One of each reads as one: it said "1 mistakes of class 0 in 1 samples".
    alone = ranker.rank(features[:1], labels[:1], solver=FixedShifts(), top_k=2)
    assert alone.summary().splitlines()[0].startswith("1 mistake of class 0 in 1 sample; ")
    assert alone.summary().splitlines()[-1] == f"{alone.num_converged} of 1 counterfactual flipped the prediction"
    assert ranker.rank(features[:1], torch.ones(1, dtype=torch.long), solver=FixedShifts()).summary() == (
        "no mistakes of class 1 in 1 sample: nothing to explain")
    with pytest.raises(ValueError, match="limit must be 0"):
        right.summary(limit=-1)


class Shifts(FixedShifts):
    """A solver double returning the ω it is given."""

    def __init__(self, omega):
        self.omega = omega

    def solve(self, weight, bias, features, labels, *, l1, l2, max_iterations, callback_on_step_end=None):
        n = len(features)
        return CounterfactualSolution(self.omega[:n], torch.ones(n, dtype=torch.bool), torch.full((n,), 7))


def test_each_list_breaks_ties_by_the_size_of_the_mean_shift_before_the_neuron_id():
    # Neurons 1, 2 and 3 are each excessive in one mistake's top-1 and 4 in none; 3's mean ω
    # is the largest in size, then 2's, then 1's; the insufficient ones mirror them.
    omega = torch.tensor([
        [4.0, -1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, -2.0, 1.0, 0.0],
        [0.0, 0.0, 0.5, -3.0, 0.0],
    ])
    ranking = MistakeNeuronRanker(always_wrong_head(5)).rank(torch.rand(3, 5), torch.zeros(3, dtype=torch.long),
                                                             solver=Shifts(omega), top_k=1, cut_ratio=0)
    means = {n.neuron: abs(n.mean_omega) for n in ranking.excessive}
    assert means[3] > means[2] > means[1]
    assert [n.neuron for n in ranking.excessive] == [3, 2, 1]
    assert [n.neuron for n in ranking.insufficient] == [0, 3, 2]


def test_a_cut_of_1_keeps_the_neurons_in_every_mistake_s_top_k():
    omega = torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # neuron 0 first in each, 2 in one
    ranker = MistakeNeuronRanker(always_wrong_head(3))
    features, labels = torch.rand(3, 3), torch.zeros(3, dtype=torch.long)
    assert ranker.rank(features, labels, solver=Shifts(omega), top_k=1, cut_ratio=0).neuron_ids == [0, 2]
    assert ranker.rank(features, labels, solver=Shifts(omega), top_k=1, cut_ratio=1.0).neuron_ids == [0]


def test_the_ranker_s_defaults_are_the_paper_s():
    # The faithful solver with λ1 = 0.1, λ2 = 0.01 and 1000 steps, the top 5 per mistake and
    # a cut at 3 %, and 3 top classes per neuron. On a random head of 64 small weights some
    # mistakes take hundreds of steps, some neurons lie just above the cut and some below it.
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 6)
    with torch.no_grad():
        head.weight.copy_(torch.randn(6, 64, generator=g) * 0.02)
        head.bias.zero_()
    features, labels = torch.relu(torch.randn(200, 64, generator=g)), torch.randint(0, 6, (200,), generator=g)
    ranker = MistakeNeuronRanker(head)
    default = ranker.rank(features, labels)
    explicit = ranker.rank(features, labels, solver="faithful", l1=0.1, l2=0.01, max_iterations=1000, cut_ratio=0.03,
                           top_k=5, num_top_classes=3)
    assert default.neurons == explicit.neurons and torch.equal(default.omega, explicit.omega)
    assert default.solver == "faithful" and default.top_k == 5
    assert default.iterations.max() > 200 and default.num_converged == default.num_mistakes
    assert any(0.03 <= n.rank_ratio < 0.05 for n in default.neurons)
    assert len(ranker.rank(features, labels, cut_ratio=0).neurons) > len(default.neurons)


def test_a_summary_with_limit_0_lists_every_neuron_however_many():
    from types import SimpleNamespace

    from explaind.methods.ranking_text import neuron_lines

    neurons = [SimpleNamespace(neuron=n, direction="insufficient", insufficient_ratio=0.5, excessive_ratio=0.0, importance=1.0,
                               top_classes=(0,)) for n in range(25)]
    assert len(neuron_lines(neurons, 0)) == 1 + 25 and len(neuron_lines(neurons, 12)) == 1 + 12  # under a header row
    with pytest.raises(ValueError, match="limit must be 0"):  # not read as "all but the last"
        neuron_lines(neurons, -1)
    # An importance at its cap (1e15) keeps the top classes in their column.
    huge = [SimpleNamespace(**{**vars(neurons[0]), "importance": 1e15}), neurons[1]]
    assert len({line.index(" 0", 60) for line in neuron_lines(huge, 0)[1:]}) == 1


def test_importances_read_with_two_decimals_below_1e6_and_in_exponent_form_from_it():
    # Every power of ten up to the 1e15 cap keeps the top classes in their column (1e7's
    # "10000000.00" would push them out), and the form changes at 1e6 itself.
    from types import SimpleNamespace

    from explaind.methods.ranking_text import neuron_lines

    neurons = [SimpleNamespace(neuron=e, direction="excessive", insufficient_ratio=0.0, excessive_ratio=1.0, importance=10.0**e, top_classes=("cat",))
               for e in range(16)]
    lines = neuron_lines(neurons, 0)
    assert {line.index("cat") for line in lines[1:]} == {lines[0].index("top classes")}
    importance = {line.split()[0]: line.split()[4] for line in lines[1:]}
    assert (importance["0"], importance["5"], importance["6"], importance["15"]) == ("1.00", "100000.00", "1.00e+06", "1.00e+15")
    below = SimpleNamespace(**{**vars(neurons[0]), "importance": 999999.99})
    assert neuron_lines([below], 0)[1].split()[4] == "999999.99"


def test_mistakes_alike_give_every_resample_the_ranking_s_top_5_and_nothing_else():
    # Every mistake has the same ω: each neuron is in every top-8, and the top-5 is the
    # five largest |ω| (2, 7, 0, 5, 3), in every resample.
    row = torch.tensor([3.0, -0.5, -8.0, 2.0, 1.0, 2.5, 0.7, 4.0])
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(
        torch.rand(6, 8), torch.zeros(6, dtype=torch.long), solver=Shifts(row.expand(6, 8)), top_k=8,
        stability_resamples=50)
    assert ranking.neuron_ids[:5] == [2, 7, 0, 5, 3] and ranking.stability_resamples == 50
    lines = ranking.summary(limit=2).splitlines()
    assert lines[1:4] == ["  neuron  direction     insufficient  excessive  importance  stability  top classes",
                          "       2  excessive               0%       100%        1.00       100%  0; 1",
                          "       7  insufficient          100%         0%        1.00       100%  0; 1"]
    assert lines[4] == "stability: share of 50 bootstrap resamples of the mistakes whose own ranking has the neuron in its top 5"
    assert {n.neuron: n.stability for n in ranking.neurons} == {2: 1.0, 7: 1.0, 0: 1.0, 5: 1.0, 3: 1.0, 1: 0.0, 4: 0.0, 6: 0.0}


def test_a_neuron_of_one_mistake_is_in_the_resamples_that_draw_it_and_the_numbers_repeat():
    # Nine of ten mistakes need neuron 0, one needs neuron 1: a resample holds 1 where it
    # draws that mistake, 1 - 0.9 ** 10 = 0.65 of them (not where it is in no drawn
    # mistake's top-k, though the top 5 then has room for it).
    omega = torch.zeros(10, 8)
    omega[:9, 0], omega[9, 1] = 1.0, 1.0
    ranker = MistakeNeuronRanker(always_wrong_head())
    features, labels = torch.rand(10, 8), torch.zeros(10, dtype=torch.long)
    ranking = ranker.rank(features, labels, solver=Shifts(omega), top_k=1, stability_resamples=1000)
    assert ranking.neuron_ids == [0, 1]
    assert ranking.neurons[0].stability == 1.0
    assert ranking.neurons[1].stability == pytest.approx(1 - 0.9 ** 10, abs=0.05)
    again = ranker.rank(features, labels, solver=Shifts(omega), top_k=1, stability_resamples=1000)
    assert [n.stability for n in again.neurons] == [n.stability for n in ranking.neurons]


def test_without_resamples_no_stability_is_computed():
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(
        torch.rand(4, 8), torch.zeros(4, dtype=torch.long), solver=FixedShifts(), top_k=2)
    assert ranking.stability_resamples == 0 and all(n.stability == 0.0 for n in ranking.neurons)


@pytest.mark.parametrize("seed", range(6))
def test_stability_is_the_share_of_resamples_whose_own_ranking_starts_with_the_neuron(seed):
    # The reference ranks each resample's mistakes with ``rank`` itself (no cut), the same
    # draws: ω of small integers ties both the top-k counts and |mean ω|.
    torch.manual_seed(seed)
    num_mistakes, dim, resamples = 12, 15, 30
    omega = torch.randint(-2, 3, (num_mistakes, dim)).float() * (torch.rand(num_mistakes, dim) < 0.5)
    ranker = MistakeNeuronRanker(always_wrong_head(dim))
    features, labels = torch.rand(num_mistakes, dim), torch.zeros(num_mistakes, dtype=torch.long)
    ranking = ranker.rank(features, labels, solver=Shifts(omega), top_k=3, cut_ratio=0.0, stability_resamples=resamples)
    draws = torch.randint(num_mistakes, (resamples, num_mistakes), generator=torch.Generator().manual_seed(_ranking.STABILITY_SEED))
    held = torch.zeros(dim)
    for drawn in draws:
        resampled = ranker.rank(features, labels, solver=Shifts(omega[drawn]), top_k=3, cut_ratio=0.0)
        held[resampled.neuron_ids[:_ranking.STABILITY_TOP]] += 1
    assert {n.neuron: n.stability for n in ranking.neurons} == {n.neuron: held[n.neuron].item() / resamples for n in ranking.neurons}


def _dense_stability(omega, insufficient_top, excessive_top, resamples, chunk):
    """The stability as first written: all (B, M) draw counts at once, times (M, D) 0/1
    indicators of the top-k ids (1.2 GB beyond ω at M = 50,000, D = 2048)."""
    num_mistakes, dim = omega.shape
    draws = torch.randint(num_mistakes, (resamples, num_mistakes), generator=torch.Generator().manual_seed(_ranking.STABILITY_SEED))
    weights = torch.zeros(resamples, num_mistakes).scatter_add_(1, draws, torch.ones(resamples, num_mistakes))
    insufficient, excessive = (torch.zeros(num_mistakes, dim + 1).scatter_(1, torch.where(top >= 0, top, dim), 1.0)[:, :dim]
                               for top in (insufficient_top, excessive_top))
    held = torch.zeros(dim, dtype=torch.float64)
    for start in range(0, resamples, chunk):
        part = weights[start:start + chunk]
        counts = torch.maximum(part @ insufficient, part @ excessive)
        first = _ranking._rank_order(counts, (part @ omega) / num_mistakes)[:, :_ranking.STABILITY_TOP]
        listed = counts.gather(1, first) > 0
        held.index_add_(0, first[listed], torch.ones(int(listed.sum()), dtype=torch.float64))
    return held / resamples


@pytest.mark.parametrize("num_mistakes, dim, top_k, resamples, chunk", [  # k * 16 <= D: ids added one by one; else blocks
    (1, 3, 1, 7, 50), (9, 4, 4, 13, 4), (40, 16, 5, 101, 50), (300, 64, 5, 120, 7), (64, 10, 10, 33, 1),
    (1, 32, 2, 9, 50), (300, 256, 5, 120, 7), (2000, 128, 3, 60, 25), (100, 160, 10, 20, 3)])
@pytest.mark.parametrize("shifts", ["continuous", "tied integers, -1 padded", "no negative ω"])
def test_stability_drawn_chunk_by_chunk_without_indicators_equals_the_dense_products(num_mistakes, dim, top_k, resamples, chunk, shifts,
                                                                                      monkeypatch):
    # Counting each resample's top-k without (M, D) indicators (its draws added id by id, or
    # blocks of 40 mistakes' indicators) and drawing (chunk, M) at a time must give the same
    # shares, bit for bit.
    monkeypatch.setattr(_ranking, "INDICATOR_BLOCK", 40 * (dim + 1))
    generator = torch.Generator().manual_seed(num_mistakes + dim)
    omega = torch.randn(num_mistakes, dim, generator=generator)
    if shifts != "continuous":  # |mean ω| and top-k counts tied, rows with fewer than k nonzero ω
        omega = torch.randint(-2, 3, (num_mistakes, dim), generator=generator).float() * (torch.rand(num_mistakes, dim, generator=generator) < 0.3)
        omega[1::3, top_k - 1:] = 0.0  # fewer than k shifts each way
        omega[2::3] = 0.0  # none: rows of -1 only
    if shifts == "no negative ω":
        omega = omega.abs()
    insufficient_top, excessive_top = _ranking._top_neurons(omega, top_k), _ranking._top_neurons(-omega, top_k)
    assert (excessive_top == -1).all() or shifts != "no negative ω"
    assert (insufficient_top[1::3] == -1).any(1).all() or shifts == "continuous"
    shares, drawn = _ranking.stability(omega, insufficient_top, excessive_top, resamples, chunk=chunk)
    assert drawn == resamples and shares.tolist() == _dense_stability(omega, insufficient_top, excessive_top, resamples, chunk).tolist()


class _LargestTensorMade(torch.overrides.TorchFunctionMode):
    """Records the most elements of any tensor a torch call makes while active (not one it
    returns as given: ``omega.to`` of a float32 ω)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        given = {arg.data_ptr() for arg in args if isinstance(arg, torch.Tensor)}
        if isinstance(result, torch.Tensor) and result.data_ptr() not in given:
            self.numel = max(self.numel, result.numel())
        return result


@pytest.mark.parametrize("dim, top_k", [(256, 16), (64, 64)])  # ids added one by one; blocks of indicators
def test_stability_makes_no_tensor_of_the_mistakes_top_k_ids_per_chunk(dim, top_k, monkeypatch):
    # A (M, k) copy of the -1 padded ids, made in each chunk, was 819 MB at M = 50,000 and
    # k = D = 2048 (a peak RSS 952 MB above ω's): the largest made now is the (b, M) draws
    # (the blocks of indicators made smaller here).
    monkeypatch.setattr(_ranking, "INDICATOR_BLOCK", 20 * (dim + 1))
    num_mistakes, chunk = 500, 4
    omega = torch.randn(num_mistakes, dim, generator=torch.Generator().manual_seed(0))
    insufficient_top, excessive_top = _ranking._top_neurons(omega, top_k), _ranking._top_neurons(-omega, top_k)
    with _LargestTensorMade() as made:
        _ranking.stability(omega, insufficient_top, excessive_top, 10, chunk=chunk)
    assert made.numel == chunk * num_mistakes < num_mistakes * top_k


class _DrawsAlive(torch.overrides.TorchFunctionMode):
    """Weak references to every (b, M) tensor a torch call makes while active, int64 (the
    draws) and not (their counts per mistake and copies of them)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.draws, self.others = shape, [], []
        self.randint_calls = 0

    def alive(self, refs):
        return sum(ref() is not None for ref in refs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.randint:
            self.randint_calls += 1
            assert self.alive(self.draws) + self.alive(self.others) == 0, "an earlier chunk's (b, M) tensors are held while the next draws"
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.numel() == self.shape[0] * self.shape[1]:
            (self.draws if result.dtype == torch.int64 else self.others).append(weakref.ref(result))
        return result


def test_stability_frees_a_chunk_s_draws_before_counting_them_and_the_chunk_before_the_next(monkeypatch):
    # The (b, M) tensors are what grows with M: the int64 draws (20 MB a chunk at M = 50,000)
    # held while they were counted and ranked, and a chunk's tensors still held while the
    # next chunk drew, raised stability_cost.py's peak at M = 50,000 (B = 200) from 34 MB to 68-72 (two runs).
    num_mistakes, chunk = 300, 4
    omega = torch.randn(num_mistakes, 32, generator=torch.Generator().manual_seed(0))
    insufficient_top, excessive_top = _ranking._top_neurons(omega, 5), _ranking._top_neurons(-omega, 5)
    counted = []
    real_top_counts = _ranking._top_counts

    def top_counts(weights, top, dim):
        counted.append(mode.alive(mode.draws))
        return real_top_counts(weights, top, dim)

    monkeypatch.setattr(_ranking, "_top_counts", top_counts)
    with _DrawsAlive((chunk, num_mistakes)) as mode:
        _ranking.stability(omega, insufficient_top, excessive_top, 3 * chunk, chunk=chunk)
    assert mode.randint_calls == 3 and len(mode.draws) == 3
    assert counted == [0] * 6  # two top-k lists a chunk, each counted with no draws alive


def test_stability_breaks_a_tie_of_mean_omega_as_rank_does_where_the_sums_differ_in_rounding():
    # Neurons 4 and 5 shift only mistake 0, by adjacent float32s: their ω sums differ, but
    # divided by M = 3 their means are equal, so ``rank`` ties them and lists 4 first. The
    # resamples ordered by the sum put 5 in the top 5 of every resample drawing mistake 0.
    smaller, larger = 1.5000011920928955, 1.500001311302185
    assert torch.tensor(larger) > torch.tensor(smaller) and torch.tensor(larger) / 3 == torch.tensor(smaller) / 3
    omega = torch.tensor([[10.0] * 4 + [smaller, larger], [10.0] * 4 + [0.0, 0.0], [10.0] * 4 + [0.0, 0.0]])
    ranker = MistakeNeuronRanker(always_wrong_head(6))
    features, labels = torch.rand(3, 6), torch.zeros(3, dtype=torch.long)
    ranking = ranker.rank(features, labels, solver=Shifts(omega), top_k=6, cut_ratio=0.0, stability_resamples=40)
    assert ranking.neuron_ids == [0, 1, 2, 3, 4, 5]
    draws = torch.randint(3, (40, 3), generator=torch.Generator().manual_seed(_ranking.STABILITY_SEED))
    drawing_the_first = float((draws == 0).any(1).float().mean())
    assert 0 < drawing_the_first < 1
    assert {n.neuron: n.stability for n in ranking.neurons} == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: drawing_the_first, 5: 0.0}


def test_a_ranking_stopped_during_its_resamples_keeps_the_shares_of_those_drawn_and_says_of_how_many():
    # 1000 resamples of M = 16384 mistakes took 3.3 s with no way to stop them; a stop then
    # threw away the ranking's stability, complete and all, where a deadline (not a cancel,
    # which raises) would rather have the shares of the resamples drawn, labelled so.
    ranker = MistakeNeuronRanker(always_wrong_head(4))
    features, labels = torch.rand(9, 4), torch.zeros(9, dtype=torch.long)
    omega = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    calls = []
    stopped = ranker.rank(features, labels, solver=Shifts(omega), top_k=1, cut_ratio=0.0, stability_resamples=120,
                          callback_on_resample_chunk_end=lambda done, total: calls.append((done, total)) or done >= 100)
    assert calls == [(50, 120), (100, 120)]
    # The first 100 of one stream of draws: the shares of a ranking that asked for 100.
    first = ranker.rank(features, labels, solver=Shifts(omega), top_k=1, cut_ratio=0.0, stability_resamples=100)
    assert not stopped.cancelled and (stopped.stability_resamples, stopped.stability_resamples_requested) == (100, 120)
    assert [n.stability for n in stopped.neurons] == [n.stability for n in first.neurons] and stopped.neurons[0].stability > 0
    assert first.stability_resamples_requested == 0
    # Said as stopped by the caller's callback (a progress bar's update() returning True, say), not a deadline.
    assert stopped.summary().splitlines()[-2] == ("stability: share of 100 bootstrap resamples (of 120 asked: callback_on_resample_chunk_end "
                                                  "stopped the rest) of the mistakes whose own ranking has the neuron in its top 5")
    finished = ranker.rank(features, labels, solver=Shifts(omega), top_k=1, stability_resamples=120,
                           callback_on_resample_chunk_end=lambda done, total: calls.append((done, total)))
    assert calls[2:] == [(50, 120), (100, 120), (120, 120)]
    assert not finished.cancelled and (finished.stability_resamples, finished.stability_resamples_requested) == (120, 0)


def test_a_float16_head_s_mean_omega_is_summed_in_float32():
    # 1000 mistakes shifting neuron 0 by 100: the float16 sum (100,000) overflowed to an
    # infinite mean ω, and rounded neuron 1's 50 to 49.97 (torch's mean sums in float32).
    omega = torch.tensor([[100.0, 50.0, -1.0, 0.0]]).repeat(1000, 1).half()
    ranking = MistakeNeuronRanker(always_wrong_head(4).half()).rank(
        torch.rand(1000, 4).half(), torch.zeros(1000, dtype=torch.long), solver=Shifts(omega), top_k=2, cut_ratio=0.0)
    assert [(n.neuron, n.mean_omega) for n in ranking.neurons] == [(0, 100.0), (1, 50.0), (2, -1.0)]


def test_a_ranking_whose_solver_was_stopped_draws_no_resamples():
    # A stop at a solver step went on to 1000 resamples of the half-solved ω (3.3 s for
    # 16384 mistakes) unless the caller stopped them again, and gave them as its stability.
    calls = []
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(
        torch.rand(4, 8), torch.zeros(4, dtype=torch.long), solver=Cancelled(), top_k=2, stability_resamples=1000,
        callback_on_resample_chunk_end=lambda done, total: calls.append(done))
    assert ranking.cancelled and calls == [] and ranking.stability_resamples == 0
    # None drawn is no time limit's stop after some: not "0 of 1000", which reads as resamples cut short.
    assert ranking.stability_resamples_requested == 0
    assert ranking.neurons and all(n.stability == 0.0 for n in ranking.neurons)


def test_a_ranking_of_no_mistakes_says_the_resamples_asked_for_as_all_drawn():
    # Nothing to resample is no stop: the B asked stands (NeuronRanking.stability_resamples,
    # "the request's stability_resamples"), none said cut short, no chunk reported.
    calls = []
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(
        torch.rand(4, 8), torch.ones(4, dtype=torch.long), solver=FixedShifts(), top_k=2, stability_resamples=200,
        callback_on_resample_chunk_end=lambda done, total: calls.append(done))
    assert not ranking.num_mistakes and not ranking.cancelled and calls == []
    assert (ranking.stability_resamples, ranking.stability_resamples_requested) == (200, 0)


def test_ties_among_more_neurons_than_torch_s_small_sort_takes_are_broken_by_id():
    # torch's CPU sort keeps equal keys in their order from 17 of them on only when asked
    # (stable=True): ties of top-k count and |mean ω| over 32 neurons, in rank and resamples.
    omega = torch.tensor([1.0, -1.0] * 16).expand(3, 32)
    ranking = MistakeNeuronRanker(always_wrong_head(32)).rank(
        torch.rand(3, 32), torch.zeros(3, dtype=torch.long), solver=Shifts(omega), top_k=32, cut_ratio=0.0, stability_resamples=10)
    assert ranking.neuron_ids == list(range(32))
    assert [n.stability for n in ranking.neurons] == [1.0] * 5 + [0.0] * 27


def test_a_single_mistake_gives_the_neurons_of_its_top_k_a_ratio_of_1():
    omega = torch.tensor([[3.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ranking = MistakeNeuronRanker(always_wrong_head()).rank(torch.rand(1, 8), torch.zeros(1, dtype=torch.long), solver=Shifts(omega), top_k=2)
    assert [(n.neuron, n.insufficient_ratio, n.excessive_ratio) for n in ranking.neurons] == [(0, 1.0, 0.0), (2, 0.0, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_mean_omega_is_the_sum_in_float32_or_wider_divided_by_the_mistakes(dtype):
    # As stability's resamples take it: float16's own mean rounded 1/3 to 0.33325, a
    # float32 sum of float64 ω to 0.3333333432674408.
    omega = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=dtype)
    ranking = MistakeNeuronRanker(always_wrong_head(2).to(dtype)).rank(
        torch.rand(3, 2, dtype=dtype), torch.zeros(3, dtype=torch.long), solver=Shifts(omega), top_k=1, cut_ratio=0.0)
    assert ranking.neurons[0].mean_omega == (torch.tensor(1.0, dtype=torch.promote_types(dtype, torch.float32)) / 3).item()


def test_a_float16_head_s_resamples_are_summed_in_float32():
    # 1000 mistakes shifting neurons 0-3 by 1000, 4 by 90 and 5 by 100: in float16 every
    # resample's sums overflowed, and the tie of infinities put 4 in the top 5, not 5.
    omega = torch.tensor([1000.0] * 4 + [90.0, 100.0]).repeat(1000, 1).half()
    ranking = MistakeNeuronRanker(always_wrong_head(6).half()).rank(
        torch.rand(1000, 6).half(), torch.zeros(1000, dtype=torch.long), solver=Shifts(omega), top_k=6, cut_ratio=0.0,
        stability_resamples=10)
    assert ranking.neuron_ids == [0, 1, 2, 3, 5, 4]
    assert {n.neuron: n.stability for n in ranking.neurons} == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 5: 1.0, 4: 0.0}
