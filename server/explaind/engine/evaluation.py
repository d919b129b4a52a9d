"""The ``evaluate_sample_set`` job: how the served classifier does on a sample set."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from explaind.v1 import inference_pb2
from ..errors import ResourceExhausted
from ..jobs import JobContext
from ..wording import counted
from .core import rows_by_digest
from .models import ClassifierVersion

if TYPE_CHECKING:
    from .core import Engine


def evaluate(engine: Engine, context: JobContext, sample_set_id: str, uid: str, count: int, version: ClassifierVersion, batch_size: int,
             max_grid_images: int, *, dense_confusion: bool) -> inference_pb2.EvaluateSampleSetResult:
    """Accuracy, per-class accuracy, confusion matrix, the mistakes (most confident
    first) and a ``mistakes.png`` grid artifact captioned ``true>predicted``, of the set
    of ``uid`` as it was when it held ``count`` samples (at the submit). Without
    ``dense_confusion`` the matrix is its non-zero cells: (C, C) counts of 21k classes
    are 441M, a response of at least as many bytes. With it too, where the whole matrix
    and the per-class rows beside it are over the job's result limit: 5,780 classes'
    33.4M counts fit it alone, and the job failed for the rows of their names."""
    context.stage("inference")
    logits, labels, digests = engine.sample_set_logits(sample_set_id, version=version, batch_size=batch_size, context=context, uid=uid, count=count)
    context.raise_if_cancelled()
    # The largest logit, as Predict, a ranking and an edit's evaluation classify: softmax
    # rounds logits a rounding step apart to equal probabilities, whose max took the lower
    # class (162 of 4096 rows on a decision boundary).
    predicted = logits.argmax(dim=1)
    confidence = torch.softmax(logits, dim=1).gather(1, predicted[:, None]).squeeze(1)
    names = version.class_names
    num_classes = len(names)
    correct = predicted == labels
    wrong = torch.nonzero(~correct).flatten()
    wrong = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)]  # equally sure ones in sample order
    result = inference_pb2.EvaluateSampleSetResult(
        sample_set_id=sample_set_id,
        model_version=version.version,
        sample_count=len(labels),
        accuracy=float(correct.double().mean()),  # as a head version's evaluation (float32 gave 0.97500002)
    )
    # Counted in one pass (a mask per class took C x N: 4.5 s for 21,843 classes of 5 samples).
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    hits = torch.bincount(labels[correct], minlength=num_classes).tolist()
    for name, count, hit in zip(names, counts, hits, strict=True):
        result.per_class.add(class_name=name, count=count, accuracy=hit / count if count else float("nan"))
    cells = labels * num_classes + predicted  # each sample's row-major cell
    if dense_confusion:
        result.confusion_matrix.extend(torch.bincount(cells, minlength=num_classes * num_classes).tolist())
        try:  # the mistakes, added below, may be cut to fit; the matrix and the per-class rows may not
            engine.jobs.require_result_fits(result)
        except ResourceExhausted:
            result.ClearField("confusion_matrix")
            dense_confusion = False
    if not dense_confusion:
        cells, counts = torch.unique(cells, return_counts=True)
        order = torch.argsort(counts, descending=True, stable=True)  # most samples first, then row-major
        for cell, samples in zip(cells[order].tolist(), counts[order].tolist()):
            result.confusion_cells.add(label=cell // num_classes, predicted=cell % num_classes, count=samples)
    # Whole columns read at once: three tensor reads a mistake took 40 ms for 10,000 of them, 5 times this.
    for index, label, predicted_class, probability in zip(wrong.tolist(), labels[wrong].tolist(), predicted[wrong].tolist(),
                                                          confidence[wrong].tolist(), strict=True):
        result.mistakes.add(sample_index=index, label=label, predicted=predicted_class, probability=probability)
    context.stage("images")
    shown = wrong[:max_grid_images].tolist()
    context.report_progress(len(labels), len(labels), f"drawing {counted(len(shown), 'mistake')}")
    captions = [f"{names[int(labels[i])]}>{names[int(predicted[i])]}" for i in shown]
    # Cached features classify a set without decoding it: an image that no longer decodes
    # fails here, naming every sample holding it as a computation's decode would.
    with engine.reading_images_of(sample_set_id, "sample_set_id", rows_by_digest(digests)):
        grid = engine.sample_grid([digests[i] for i in shown], captions, job=context)
    context.save_image("mistakes.png", grid)
    return result
