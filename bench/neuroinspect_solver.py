"""Batched counterfactual solvers vs the authors' per-sample loop, measured in one run.

    python bench/neuroinspect_solver.py [--scenario spurious_background] [--device cpu|cuda]

Explains every test-split mistake of a shipped world classifier. When the split has
fewer than ``--min-mistakes``, correctly classified samples are added with their
runner-up class as the counterfactual target (the same optimisation problem), so the
comparison always runs at scale. Prints the faithful solver's speed-up over the
per-sample ``torch.optim.SGD`` loop, their top-5 agreement, and how the proximal
solver's explanations compare.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from explaind.methods.neuroinspect import FaithfulSGD, FeatureExtractor, ProximalGradient
from explaind.world.assets import ASSETS_DIR, classifier_dir
from explaind.world.classifier import load_classifier
from explaind.world.scenarios import get_scenario

from _cli import bench_parser, positive_int  # bench/, the script's directory, is on sys.path


def reference_solve(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, l1: float = 0.1,
                    l2: float = 0.01, max_iterations: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' method: one ``torch.optim.SGD`` run per sample, stopping once it flips."""
    omegas, iterations = [], []
    for feature, label in zip(features, labels):
        omega = torch.zeros(1, feature.shape[0], requires_grad=True)
        optimiser = torch.optim.SGD([omega], lr=0.01, momentum=0.9)
        for step in range(max_iterations + 1):
            logits = head(feature.unsqueeze(0) + omega)
            if logits.argmax(1).item() == label.item() or step == max_iterations:
                break
            dim = omega.shape[1]
            loss = F.cross_entropy(logits, label.view(1)) + l1 * omega.norm(p=1) / dim + l2 * omega.norm(p=2) / dim
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        omegas.append(omega.detach()[0])
        iterations.append(step)
    return torch.stack(omegas), torch.tensor(iterations)


def top5_sets(omega: torch.Tensor) -> torch.Tensor:
    """Each row's five largest-ω neuron ids (N, 5), sorted so that equal sets compare equal."""
    return omega.topk(5, dim=1).indices.sort(dim=1).values


def same_top5_share(omega: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of samples whose top-5 neurons are the same set in ``omega`` and ``reference`` (N, D)."""
    return (top5_sets(omega) == top5_sets(reference)).all(1).float().mean().item()


# Issue 4's acceptance 1 takes the speed-up at 500 mistakes or more: on fewer, the per-sample
# loop's fixed costs weigh less against the batched solver's and the ratio reads low.
ACCEPTANCE_PROBLEMS = 500


def scale_warning(problems: int) -> str | None:
    """Why a speed-up measured on ``problems`` is not the one acceptance 1 asks for, or None."""
    if problems >= ACCEPTANCE_PROBLEMS:
        return None
    return (f"warning: {problems} problems, fewer than the {ACCEPTANCE_PROBLEMS} acceptance 1 measures the speed-up at "
            "(raise --min-mistakes, or pick a scenario with a larger test split)")


def counterfactual_problems(logits: torch.Tensor, labels: torch.Tensor, min_mistakes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples to explain and their target classes: every mistake (target: its label),
    then correctly classified samples in order (target: their runner-up class) until there
    are ``min_mistakes`` problems, or the samples run out."""
    wrong = logits.argmax(1) != labels
    targets = labels.clone()
    runner_up = logits.topk(2, dim=1).indices[:, 1]
    extra = (~wrong).nonzero().squeeze(1)[: max(0, min_mistakes - int(wrong.sum()))]
    targets[extra] = runner_up[extra]
    chosen = torch.cat([wrong.nonzero().squeeze(1), extra])
    return chosen, targets[chosen]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--scenario", default="spurious_background", help="world classifier whose test mistakes are explained")
    parser.add_argument("--assets", default=str(ASSETS_DIR), help="assets root holding classifiers/<scenario>")
    parser.add_argument("--min-mistakes", type=positive_int, default=600, help="problems at least (runner-up targets make up the rest)")
    parser.add_argument("--device", default="cpu", help="device of the batched solvers (the reference runs on CPU)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads for both paths")
    parser.add_argument("--repeats", type=positive_int, default=3, help="each side's time: the best of this many runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_classifier(classifier_dir(args.scenario, Path(args.assets)))
    extractor = FeatureExtractor(model, feature_layer=model.config.feature_layer, head=model.config.head)
    test = get_scenario(args.scenario).dataset("test").all()
    features = extractor.features(test.images)
    with torch.no_grad():
        logits = extractor.head(features)
    chosen, targets = counterfactual_problems(logits, test.labels, args.min_mistakes)
    features = features[chosen]
    num_wrong = int((logits.argmax(1) != test.labels).sum())
    print(f"{args.scenario}: {num_wrong} test mistakes + {len(chosen) - num_wrong} runner-up targets = {len(chosen)} problems, "
          f"D = {features.shape[1]}, threads = {args.threads}, batched on {args.device}")
    if warning := scale_warning(len(chosen)):
        print(warning, file=sys.stderr)

    head = extractor.head.cpu()
    weight, bias = head.weight.detach(), head.bias.detach()

    weight_on, bias_on, features_on, targets_on = (t.to(args.device) for t in (weight, bias, features, targets))

    def best_of(solve):
        """Best wall time of --repeats runs of ``solve(n)`` on all problems (n None), and
        its solution. A warm-up on two problems comes first: building the first optimiser
        imports torch._dynamo (about 1.4 s), a cost of neither side."""
        solve(2)
        best, solution = float("inf"), None
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            solution = solve(None)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, solution

    faithful_seconds, faithful = best_of(lambda n: FaithfulSGD().solve(weight_on, bias_on, features_on[:n], targets_on[:n]))
    proximal_seconds, proximal = best_of(lambda n: ProximalGradient().solve(weight_on, bias_on, features_on[:n], targets_on[:n]))
    reference_seconds, (reference_omega, reference_iterations) = best_of(lambda n: reference_solve(head, features[:n], targets[:n]))

    omega = faithful.omega.cpu()
    same_top5 = same_top5_share(omega, reference_omega)
    same_steps = (faithful.iterations.cpu() == reference_iterations).float().mean().item()
    proximal_overlap = (top5_sets(proximal.omega.cpu()).unsqueeze(2) == top5_sets(omega).unsqueeze(1)).any(2).float().mean().item()
    print(f"\n{'solver':<30}{'seconds':>10}{'speed-up':>10}{'mean steps':>12}{'flipped':>9}")
    print(f"{'reference per-sample loop':<30}{reference_seconds:>10.3f}{1.0:>10.1f}{reference_iterations.float().mean():>12.1f}{'':>9}")
    print(f"{'faithful (batched)':<30}{faithful_seconds:>10.3f}{reference_seconds / faithful_seconds:>10.1f}"
          f"{faithful.iterations.float().mean():>12.1f}{faithful.converged.float().mean():>9.3f}")
    print(f"{'proximal (FISTA, batched)':<30}{proximal_seconds:>10.3f}{reference_seconds / proximal_seconds:>10.1f}"
          f"{proximal.iterations.float().mean():>12.1f}{proximal.converged.float().mean():>9.3f}")
    print(f"\nfaithful vs reference: identical top-5 sets {same_top5:.2%} of samples, identical step counts {same_steps:.2%}, "
          f"max |Δω| {(omega - reference_omega).abs().max():.2e}")
    print(f"proximal vs faithful: {proximal_overlap:.2%} of each sample's top-5 shared; "
          f"exact zeros in ω: proximal {(proximal.omega == 0).float().mean():.2%}, faithful {(omega == 0).float().mean():.2%}")


if __name__ == "__main__":
    main()
