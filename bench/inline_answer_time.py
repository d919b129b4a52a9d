"""Whether an inline ranking stopped before its call's deadline can still answer in time:
the seconds a chunk of stability resamples takes beside those that building and
serialising the ranking's answer take after them, on synthetic ω, in one run.

    python bench/inline_answer_time.py [--mistakes 256] [--dim 2048] [--classes 1000] [--device cpu] [--repeats 5]

The engine stops the resamples once the time left to the call is under twice the slowest
chunk so far plus a fixed reserve for the answer (server/explaind/engine/neuroinspect.py,
``_RESAMPLE_ANSWER_SECONDS``): "answer / 2 chunks" above 1 means twice a chunk alone would
not cover even the answer's building, before its trip over the network. The answer is
built as the engine builds it (a neuron for each of D, the ``include_samples`` summaries
and ω of every mistake, 256 at most inline) and serialised once.
"""

from __future__ import annotations

import argparse
import time

from _cli import bench_parser, median_seconds, positive_int  # bench/, the script's directory, is on sys.path


def slowest_chunk_seconds(args: argparse.Namespace) -> float:
    """The slowest of a 1000-resample stability run's chunks of 50, in seconds."""
    import torch

    from explaind.methods.neuroinspect._ranking import _top_neurons, stability

    omega = torch.randn(args.mistakes, args.dim, generator=torch.Generator().manual_seed(0)).to(args.device)
    insufficient, excessive = _top_neurons(omega, 5), _top_neurons(-omega, 5)
    stability(omega, insufficient, excessive, 50)  # its code paths' first run
    chunks, last = [], [time.perf_counter()]

    def timed(done: int, total: int) -> bool:
        if args.device != "cpu":
            torch.cuda.synchronize()
        now = time.perf_counter()
        chunks.append(now - last[0])
        last[0] = now
        return False

    stability(omega, insufficient, excessive, 1000, callback_on_resample_chunk_end=timed)
    return max(chunks)


def answer(args: argparse.Namespace, include_samples: bool) -> bytes:
    """The serialised RankMistakeNeuronsResponse of ``args.mistakes`` mistakes at D = ``args.dim``."""
    import torch

    from explaind.messages import array_to_tensor
    from explaind.v1 import neuroinspect_pb2

    omega = torch.randn(args.mistakes, args.dim, generator=torch.Generator().manual_seed(1)).to(args.device)
    names = [f"class {c:04d} of a longer name" for c in range(args.classes)]
    ranking = neuroinspect_pb2.NeuronRanking(sample_set_id="set", model_version="v", class_index=0, class_name=names[0], solver="faithful",
                                             sample_count=4096, mistake_count=args.mistakes, converged_count=args.mistakes, top_k=5,
                                             stability_resamples=150, stability_resamples_requested=1000,
                                             predicted_as={name: 1 for name in names[1:args.mistakes + 1]})
    columns = zip(range(args.dim), omega.mean(0).tolist(), strict=True)
    for neuron, mean in columns:
        ranking.neurons.add(neuron=neuron, direction=neuroinspect_pb2.NEURON_DIRECTION_BOTH, insufficient_ratio=0.1, excessive_ratio=0.1,
                            mean_omega=mean, importance=1.0, top_classes=[1, 2, 3], top_class_names=names[1:4], stability=0.5)
    if include_samples:
        host = omega.float().cpu()
        for index, l1 in enumerate(host.abs().sum(1).tolist()):
            ranking.mistakes.add(sample_index=index, predicted_class=1, converged=True, iterations=100,
                                 insufficient_neurons=list(range(5)), excessive_neurons=list(range(5)), omega_l1=l1)
        ranking.omega.CopyFrom(array_to_tensor(host.numpy()))
    response = neuroinspect_pb2.RankMistakeNeuronsResponse(ranking=ranking)
    response.ByteSize()  # the servicer's and the interceptor's size checks
    return response.SerializeToString()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--mistakes", type=positive_int, default=256, help="M (the inline limit is 256)")
    parser.add_argument("--dim", type=positive_int, default=2048, help="D, the feature dimension")
    parser.add_argument("--classes", type=positive_int, default=1000, help="C, whose names the answer carries")
    parser.add_argument("--device", default="cpu", help="where the resamples run (cuda: a GPU's)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch's CPU threads")
    parser.add_argument("--repeats", type=positive_int, default=5, help="runs of each, their median printed")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    chunk = sorted(slowest_chunk_seconds(args) for _ in range(args.repeats))[args.repeats // 2]
    built = median_seconds({"bare": lambda: answer(args, False), "include_samples": lambda: answer(args, True)}, args.repeats)
    print(f"M = {args.mistakes}, D = {args.dim}, {args.device}: slowest chunk of 50 resamples {chunk * 1e3:.2f} ms (median of {args.repeats} runs)")
    for name, seconds in built.items():
        size = len(answer(args, name == "include_samples"))
        print(f"  answer {name}: {size / 1e6:.2f} MB built and serialised in {seconds * 1e3:.2f} ms; answer / 2 chunks {seconds / (2 * chunk):.2f}")


if __name__ == "__main__":
    main()
