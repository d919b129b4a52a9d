"""The in-process API type-checks, for us and for a user: explaind ships py.typed, so a
wrong annotation (a Protocol its own solvers do not satisfy, an Optional the README
unpacks unchecked) fails a user's type checker even where the code runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Appended to the README's first in-process block: what else a user reaches for, each
# value annotated with the type the API documents.
USER_SCRIPT_TAIL = '''
import torch

from explaind.methods.neuroinspect import (
    CounterfactualSolver,
    FaithfulSGD,
    HeadEvaluation,
    ProximalGradient,
    RankedNeuron,
    VisualizationResult,
    make_solver,
)
from explaind.world.clip import load_world_clip

ranker = MistakeNeuronRanker(extractor.head)
faithful = ranker.rank(features, test.labels, solver=FaithfulSGD(learning_rate=0.05, momentum=0.5), target_class=heart)
proximal = ranker.rank(features, test.labels, solver=ProximalGradient(tolerance=1e-5), top_k=3, max_iterations=200)
solver: CounterfactualSolver = make_solver("proximal")
solver_name: str = solver.name
omega: torch.Tensor = faithful.omega
top: RankedNeuron = proximal.neurons[0]
scores: tuple[float, float, tuple[int, ...]] = (top.rank_ratio, top.importance, top.top_classes)
maps: torch.Tensor = extractor.feature_maps(test.images, batch_size=64)

evaluation: HeadEvaluation = edit.after
worst_class: tuple[int, float] = evaluation.worst_class
worst_group: tuple[str, float] | None = edit.before.worst_group
if worst_group is not None:
    print(f"{worst_group[0]}: {worst_group[1]:.2f} of {evaluation.accuracy:.2f}")
head_weight: torch.Tensor = new_head.weight

clip_model, tokenizer, _ = load_world_clip()
with_clip = ClipIllusion(model, model.config.feature_layer, clip_model, tokenizer,
                         class_names=model.config.class_names, head=model.config.head, image_size=64)
result: VisualizationResult = with_clip.visualize(
    [(ranking.neuron_ids[0], None), (1, heart)], epsilon=1.0, steps=10, seed=1,
    callback_on_step_end=lambda step, steps, images: step >= steps // 2,
)
visualised: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (result.images, result.masks, result.clip_similarity)
'''


def _mypy(tmp_path: Path, *arguments: str) -> None:
    """mypy with the project's configuration and a cache of this test's own."""
    checked = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                              "--cache-dir", str(tmp_path / "mypy_cache"), *arguments],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, f"mypy {' '.join(arguments)}:\n{checked.stdout}{checked.stderr}"


def test_the_package_and_a_strict_user_script_on_its_in_process_api_type_check(tmp_path):
    _mypy(tmp_path)  # the package, as [tool.mypy] names it
    section = README.read_text().split("## The methods in-process", 1)[1].split("\n## ", 1)[0]
    script = tmp_path / "user_script.py"
    script.write_text(re.findall(r"```python\n(.*?)```", section, flags=re.S)[0] + USER_SCRIPT_TAIL)
    # Silent imports: the errors a user sees are their own script's, as with an installed explaind.
    _mypy(tmp_path, "--strict", "--follow-imports=silent", str(script))
