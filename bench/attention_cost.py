"""What do attention maps cost: a plain classifier request, and one that asks for the map?

    python bench/attention_cost.py [--preset vit-tiny] [--batch 1] [--rounds 60] [--threads 2]

Exports a random-weight ViT classifier (1000 classes, 224x224) as vit-export does, the classifier's graph and its
attention graph, plus the design that was rejected: one graph with both outputs. Then times onnxruntime CPU
inference (sessions opened as the server opens them, one per contender so that each finds its threads as cold as
the others do) in paired, interleaved rounds whose order rotates, so drift in machine load hits all alike:

- plain:          the classifier's graph, logits (plain /classify; the same graph as before attention maps existed);
- with-map:       the classifier's graph, then the attention graph (/classify?attention=true);
- one-graph:      a single graph with logits and attention, fetching only the logits with
                  RunOptions.only_execute_path_to_fetches: what plain /classify would cost had the map been an
                  extra output of the classifier's graph.

Prints each contender's median time per batch and the median of its per-round ratios against `plain`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
import torch
from einops import rearrange

from export.graphs import AttentionGraph, ClassifierGraph, attention_rollout
from export.onnx_export import export_onnx
from model.data import IMAGENET_MEAN, IMAGENET_STD
from model.presets import vit_preset
from model.vit import VisionTransformer
from modelrepo.names import ATTENTION, IMAGES, LOGITS
from modelrepo.session import open_session


class OneGraph(AttentionGraph):
    """The rejected design: logits and the map from one graph."""

    output_names = (LOGITS, ATTENTION)

    def forward(self, images: torch.Tensor):
        tokens, weights = self.vit.forward_features_with_attention(self.normalise(images))
        rows, cols = self.vit.config.grid_size
        flow = attention_rollout(weights, self.vit.num_prefix_tokens, self.vit.config.pooling)
        return self.vit.forward_head(self.vit.pool(tokens)), rearrange(flow, "b (h w) -> b h w", h=rows, w=cols)

    def shapes(self):
        return {**super().shapes(), LOGITS: ("float32", (-1, self.vit.config.num_classes))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    vit = VisionTransformer(vit_preset(args.preset, num_classes=1000, image_size=224)).eval()
    folder = Path(tempfile.mkdtemp(prefix="attention-cost-"))
    for name, graph in (("model", ClassifierGraph), ("attention", AttentionGraph), ("one-graph", OneGraph)):
        export_onnx(graph(vit, IMAGENET_MEAN, IMAGENET_STD), None, folder / f"{name}.onnx")

    def session(name: str) -> ort.InferenceSession:
        return open_session(folder / f"{name}.onnx", ["CPUExecutionProvider"], args.threads)

    pruned = ort.RunOptions()
    pruned.only_execute_path_to_fetches = True
    plain, classifier, attention, one_graph = session("model"), session("model"), session("attention"), session("one-graph")
    contenders = {
        "plain": lambda feeds: plain.run([LOGITS], feeds),
        "with-map": lambda feeds: (classifier.run([LOGITS], feeds), attention.run([ATTENTION], feeds)),
        "one-graph": lambda feeds: one_graph.run([LOGITS], feeds, pruned),
    }
    feeds = {IMAGES: np.random.default_rng(0).integers(0, 256, (args.batch, 224, 224, 3), dtype=np.uint8)}
    print(f"{args.preset} 224x224, batch {args.batch}, {args.threads} threads, onnxruntime {ort.__version__}, "
          f"{args.rounds} rounds")
    for run in contenders.values():  # warm-up: allocations for this shape
        for _ in range(3):
            run(feeds)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            contenders[name](feeds)
            times[name].append(time.perf_counter() - started)
    print(f"{'contender':12} {'median ms':>10} {'ratio vs plain (median of rounds)':>34}")
    for name in names:
        ratios = [t / p for t, p in zip(times[name], times["plain"])]
        print(f"{name:12} {statistics.median(times[name]) * 1000:10.2f} {statistics.median(ratios):34.3f}")


if __name__ == "__main__":
    main()
