"""Counterfactual solvers: the batched faithful solver against the authors' per-sample loop,
and the proximal solver's sparsity, flips and stopping rules."""

import pytest
import torch
import torch.nn.functional as F

from explaind.methods.neuroinspect import FaithfulSGD, ProximalGradient, make_solver

NUM_CLASSES, DIM = 6, 64


def reference_omega(head, feature, label, *, l1=0.1, l2=0.01, max_iterations=1000):
    """The authors' loop for one sample: torch.optim.SGD on ω, stop once the prediction is right."""
    omega = torch.zeros(1, feature.shape[0], requires_grad=True)
    optimiser = torch.optim.SGD([omega], lr=0.01, momentum=0.9)
    for step in range(max_iterations + 1):
        logits = head(feature.unsqueeze(0) + omega)
        if logits.argmax(1).item() == label.item():
            return omega.detach()[0], True, step
        if step == max_iterations:
            return omega.detach()[0], False, step
        dim = omega.shape[1]
        loss = F.cross_entropy(logits, label.view(1)) + l1 * omega.norm(p=1) / dim + l2 * omega.norm(p=2) / dim
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    head = torch.nn.Linear(DIM, NUM_CLASSES)
    features = torch.relu(torch.randn(120, DIM)) * 2
    labels = torch.randint(0, NUM_CLASSES, (120,))
    return head, features, labels


@pytest.fixture(scope="module")
def mistakes(problem):
    """The head's weight and bias, and the features and labels of the samples it gets wrong."""
    head, features, labels = problem
    weight, bias = head.weight.detach(), head.bias.detach()
    wrong = F.linear(features, weight, bias).argmax(1) != labels
    return weight, bias, features[wrong], labels[wrong]


def solve(solver, head, features, labels, **kwargs):
    return solver.solve(head.weight.detach(), head.bias.detach(), features, labels, **kwargs)


def test_faithful_batch_reproduces_the_per_sample_reference_loop(problem):
    head, features, labels = problem
    reference = [reference_omega(head, f, y) for f, y in zip(features[:60], labels[:60])]
    batched = solve(FaithfulSGD(), head, features[:60], labels[:60])
    omega = torch.stack([r[0] for r in reference])
    iterations = torch.tensor([r[2] for r in reference])
    # Samples stop at very different steps, so per-sample momentum freezing is exercised.
    assert iterations.min() == 0 and len(iterations.unique()) > 10
    assert torch.equal(batched.iterations, iterations)
    assert torch.equal(batched.converged, torch.tensor([r[1] for r in reference]))
    torch.testing.assert_close(batched.omega, omega, atol=1e-5, rtol=1e-4)
    same_top5 = (batched.omega.topk(5, 1).indices.sort(1).values == omega.topk(5, 1).indices.sort(1).values).all(1)
    assert same_top5.float().mean() >= 0.99



def test_the_solvers_hold_no_copy_of_the_features_or_a_one_hot_of_the_labels(problem):
    # The caller keeps its features to the end: a copy of the running rows made at the first
    # retirement stayed beside them, and an (N, C) one-hot beside the logits (156 and 76 MB
    # for 20,000 mistakes, D = 2048, C = 1000; bench/neuroinspect_scale.py).
    from explaind.methods.neuroinspect._counterfactual import _BatchState, _cross_entropy_gradient

    head, features, labels = problem
    weight = head.weight.detach()
    state = _BatchState(features, labels)
    omega = torch.randn_like(features)
    finished = torch.arange(len(features)) % 3 == 0
    keep = state.retire(finished, finished, omega, 1)
    assert state.all_features is features and vars(state).keys() == {"rows", "all_features", "labels", "omega_out", "converged", "iterations"}
    assert torch.equal(state.shifted(omega[keep]), features[keep] + omega[keep]) and torch.equal(state.labels, labels[keep])
    logits = F.linear(features, weight, head.bias.detach())
    expected = (logits.softmax(1) - F.one_hot(labels, NUM_CLASSES).float()) @ weight
    assert torch.equal(_cross_entropy_gradient(logits, labels, weight), expected)


def test_the_solver_bench_s_reference_is_the_authors_loop_up_to_its_iteration_cap(problem, monkeypatch):
    # bench/neuroinspect_solver.py times the batched solver against its own copy of the loop.
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from neuroinspect_solver import reference_solve

    head, features, labels = problem
    for cap in (3, 1000):
        reference = [reference_omega(head, f, y, max_iterations=cap) for f, y in zip(features[:12], labels[:12])]
        omega, iterations = reference_solve(head, features[:12], labels[:12], max_iterations=cap)
        assert iterations.tolist() == [r[2] for r in reference] and (cap > 3 or (iterations == cap).any())  # 3 stops some
        assert torch.equal(omega, torch.stack([r[0] for r in reference]))

def test_faithful_flips_every_mistake_and_leaves_correct_samples_at_zero(problem):
    head, features, labels = problem
    solution = solve(FaithfulSGD(), head, features, labels)
    correct = head(features).argmax(1) == labels
    assert solution.converged.all()
    assert (solution.omega[correct] == 0).all() and (solution.iterations[correct] == 0).all()
    assert (head(features + solution.omega).argmax(1) == labels).all()


def test_iteration_cap_marks_unfinished_samples(problem):
    head, features, labels = problem
    capped = solve(FaithfulSGD(), head, features, labels, max_iterations=3)
    full = solve(FaithfulSGD(), head, features, labels)
    slow = full.iterations > 3
    assert slow.any()
    assert (capped.iterations[slow] == 3).all() and not capped.converged[slow].any()
    assert torch.equal(capped.converged[~slow], full.converged[~slow])
    reference = reference_omega(head, features[slow][0], labels[slow][0], max_iterations=3)
    torch.testing.assert_close(capped.omega[slow][0], reference[0], atol=1e-6, rtol=1e-5)


def test_proximal_gives_exact_zeros_and_flips(problem):
    head, features, labels = problem
    proximal = solve(ProximalGradient(), head, features, labels)
    faithful = solve(FaithfulSGD(), head, features, labels)
    wrong = head(features).argmax(1) != labels
    assert proximal.converged.all()
    assert (head(features + proximal.omega).argmax(1) == labels).all()
    assert (proximal.omega[wrong] == 0).any() and not (faithful.omega[wrong] == 0).any()
    # A stronger L1 weight buys much sparser shifts that still flip every mistake.
    sparse = solve(ProximalGradient(), head, features, labels, l1=3.0)
    assert sparse.converged.all() and (sparse.omega[wrong] == 0).float().mean() > 0.3
    # Both explain a mistake with largely the same neurons.
    overlap = [len(set(p.topk(5).indices.tolist()) & set(f.topk(5).indices.tolist())) / 5
               for p, f in zip(proximal.omega[wrong], faithful.omega[wrong])]
    assert sum(overlap) / len(overlap) >= 0.6


def test_proximal_stops_at_tolerance_when_the_penalty_forbids_a_flip(problem):
    head, features, labels = problem
    wrong = head(features).argmax(1) != labels
    solution = solve(ProximalGradient(), head, features[wrong], labels[wrong], l1=1e6)
    assert (solution.omega == 0).all() and not solution.converged.any()
    assert (solution.iterations == 1).all()
    # A tolerance of 0 still stops an update that moves nothing.
    assert (solve(ProximalGradient(tolerance=0), head, features[wrong], labels[wrong], l1=1e6).iterations == 1).all()


def test_one_proximal_step_is_the_prox_of_a_gradient_step_of_size_2_over_the_squared_norm(problem):
    # The step 1 / L with L = ‖W‖₂² / 2 (the softmax Hessian's norm is at most 1/2), then
    # soft-thresholding by step·λ1/D and group shrinkage by step·λ2/D.
    head, features, labels = problem
    weight, bias = head.weight.detach(), head.bias.detach()
    l1, l2 = 2.0, 20.0  # both shrinkages act: about a quarter of the coordinates zeroed, the rest shrunk
    mistakes = (F.linear(features, weight, bias).argmax(1) != labels).nonzero().squeeze(1)
    solution = ProximalGradient(tolerance=0).solve(weight, bias, features[mistakes], labels[mistakes], l1=l1, l2=l2, max_iterations=1)
    step = 2 / torch.linalg.matrix_norm(weight, ord=2) ** 2
    gradient = (F.linear(features[mistakes], weight, bias).softmax(1) - F.one_hot(labels[mistakes], NUM_CLASSES)) @ weight
    shrunk = F.softshrink(-step * gradient, float(step * l1 / DIM))
    expected = shrunk * (1 - step * l2 / DIM / shrunk.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(0)
    assert (expected == 0).any() and (expected != 0).any()
    torch.testing.assert_close(solution.omega, expected, rtol=1e-4, atol=1e-6)


def test_proximal_steps_extrapolate_as_fista_does(problem):
    # Three steps by hand: x_k = prox(y_{k-1} − ∇/L), y_k = x_k + (t_{k-1} − 1) / t_k ·
    # (x_k − x_{k-1}), t_k = (1 + √(1 + 4 t_{k-1}²)) / 2 from t_0 = 1. The first
    # extrapolation weight is 0, so only the third step tells FISTA from plain ISTA.
    head, features, labels = problem
    weight, bias = head.weight.detach(), head.bias.detach()
    l1, l2 = 2.0, 20.0
    mistakes = (F.linear(features, weight, bias).argmax(1) != labels).nonzero().squeeze(1)
    features, labels = features[mistakes], labels[mistakes]
    solution = ProximalGradient(tolerance=0).solve(weight, bias, features, labels, l1=l1, l2=l2, max_iterations=3)
    step = float(2 / torch.linalg.matrix_norm(weight, ord=2) ** 2)
    omega, lookahead, t = torch.zeros_like(features), torch.zeros_like(features), 1.0
    for _ in range(3):
        gradient = (F.linear(features + lookahead, weight, bias).softmax(1) - F.one_hot(labels, NUM_CLASSES)) @ weight
        shrunk = F.softshrink(lookahead - step * gradient, step * l1 / DIM)
        new_omega = shrunk * (1 - step * l2 / DIM / shrunk.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        lookahead = new_omega + (t - 1) / t_next * (new_omega - omega)
        omega, t = new_omega, t_next
    ran = solution.iterations == 3  # not flipped by an earlier step
    assert ran.sum() >= 10
    torch.testing.assert_close(solution.omega[ran], omega[ran], rtol=1e-4, atol=1e-6)


def test_the_proximal_solver_s_defaults_are_the_paper_s_weights_and_a_tolerance_of_1e_6(mistakes):
    # l1 = 10 flips no mistake, and the iterates settle slowly: the tolerance decides when each stops.
    weight, bias, features, labels = mistakes
    default = ProximalGradient().solve(weight, bias, features, labels)
    explicit = ProximalGradient(tolerance=1e-6).solve(weight, bias, features, labels, l1=0.1, l2=0.01, max_iterations=1000)
    assert torch.equal(default.omega, explicit.omega) and torch.equal(default.iterations, explicit.iterations)
    slow = ProximalGradient().solve(weight, bias, features, labels, l1=10.0)
    assert not slow.converged.any()
    assert torch.equal(slow.iterations, ProximalGradient(tolerance=1e-6).solve(weight, bias, features, labels, l1=10.0).iterations)
    assert not torch.equal(slow.iterations, ProximalGradient(tolerance=1e-4).solve(weight, bias, features, labels, l1=10.0).iterations)


def test_the_proximal_solver_stops_at_the_first_update_that_moves_no_coordinate_by_more_than_the_tolerance(mistakes):
    weight, bias, features, labels = mistakes
    stopped = ProximalGradient(tolerance=1e-4).solve(weight, bias, features, labels, l1=10.0)
    assert not stopped.converged.any()
    # Capped runs (tolerance 0 stops nothing early) give each sample's iterates.
    iterate = lambda k: ProximalGradient(tolerance=0).solve(weight, bias, features, labels, l1=10.0, max_iterations=k).omega
    moving = (stopped.iterations > 2).nonzero().squeeze(1)[:4]  # the others stay at 0 (moved nothing at the first step)
    assert len(moving) == 4
    for i, k in zip(moving.tolist(), stopped.iterations[moving].tolist()):
        last, before, earlier = iterate(k)[i], iterate(k - 1)[i], iterate(k - 2)[i]
        assert torch.equal(stopped.omega[i], last)
        assert (last - before).abs().max() <= 1e-4 < (before - earlier).abs().max()


def test_the_proximal_tolerance_bounds_the_largest_coordinate_change_of_a_row_not_its_norm(mistakes):
    # At l1 = 10 every stopped sample moves one coordinate, where both are the same number.
    weight, bias, features, labels = mistakes
    stopped = ProximalGradient(tolerance=1e-4).solve(weight, bias, features, labels, l1=8.0)
    several = (~stopped.converged & ((stopped.omega != 0).sum(1) >= 2) & (stopped.iterations > 2)).nonzero().squeeze(1)[:4]
    assert len(several) == 4
    iterate = lambda k: ProximalGradient(tolerance=0).solve(weight, bias, features, labels, l1=8.0, max_iterations=k).omega
    for i, k in zip(several.tolist(), stopped.iterations[several].tolist()):
        last, before, earlier = iterate(k)[i], iterate(k - 1)[i], iterate(k - 2)[i]
        torch.testing.assert_close(stopped.omega[i], last)  # batches of other sizes round their products otherwise
        assert (last - before).abs().max() <= 1e-4 < (before - earlier).abs().max()


@pytest.mark.parametrize("name", ["faithful", "proximal"])
def test_callback_reports_progress_and_cancels(problem, name):
    head, features, labels = problem
    calls = []

    def stop_after_two(step, total, running):
        calls.append((step, total, running))
        return step == 2

    solution = solve(make_solver(name), head, features, labels, callback_on_step_end=stop_after_two)
    assert solution.cancelled and [c[0] for c in calls] == [1, 2] and calls[0][1] == 1000
    # Samples still running when stopped took both updates; the others stopped on their own.
    full = solve(make_solver(name), head, features, labels)
    running = full.iterations > 2
    assert running.any() and (solution.iterations[running] == 2).all()
    assert torch.equal(solution.iterations[~running], full.iterations[~running])
    assert solution.omega.shape == features.shape


@pytest.mark.parametrize("name", ["faithful", "proximal"])
def test_no_samples_solve_at_once(problem, name):
    head, features, labels = problem
    calls = []
    solution = solve(make_solver(name), head, features[:0], labels[:0], callback_on_step_end=lambda *a: calls.append(a))
    assert solution.omega.shape == (0, DIM) and len(solution.converged) == 0 and calls == []


def test_a_sample_flipped_by_the_last_update_before_a_cancel_counts_as_converged(problem):
    head, features, labels = problem
    full = solve(FaithfulSGD(), head, features, labels)
    first_flips = int(full.iterations[full.iterations > 0].min())
    cancelled = solve(FaithfulSGD(), head, features, labels, callback_on_step_end=lambda step, total, running: step == first_flips)
    assert cancelled.converged[full.iterations == first_flips].all()
    assert torch.equal(cancelled.converged, full.converged & (full.iterations <= first_flips))


def test_bad_inputs_raise_value_errors_naming_them(problem):
    head, features, labels = problem
    with pytest.raises(ValueError, match="features"):
        solve(FaithfulSGD(), head, features[:, :10], labels)
    with pytest.raises(ValueError, match="labels"):
        solve(FaithfulSGD(), head, features, labels[:5])
    with pytest.raises(ValueError, match="labels must lie"):
        solve(FaithfulSGD(), head, features, labels + NUM_CLASSES)
    with pytest.raises(ValueError, match="solver"):
        make_solver("adam")
    with pytest.raises(TypeError, match="solver must be a name or have a solve method, got object"):
        make_solver(object())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", [FaithfulSGD(), ProximalGradient()])
def test_cuda_solve_matches_cpu(problem, solver):
    head, features, labels = problem
    cpu = solve(solver, head, features, labels)
    gpu = solver.solve(*(t.cuda() for t in (head.weight.detach(), head.bias.detach(), features, labels)))
    assert (gpu.iterations.cpu() == cpu.iterations).float().mean() >= 0.99
    same_top5 = (gpu.omega.cpu().topk(5, 1).indices.sort(1).values == cpu.omega.topk(5, 1).indices.sort(1).values).all(1)
    assert same_top5.float().mean() >= 0.99
