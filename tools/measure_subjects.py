"""Measure the two pretrained subjects of issue 31 with a plain magnitude mask (no sparseham method):

    python tools/measure_subjects.py llama [--root data] [--sparsity 0.5 0.7]
    python tools/measure_subjects.py minilm [--root data] [--steps 100]

``llama``: the test perplexity of ``ROOT/llama_small/model`` dense and after one-shot magnitude pruning
of its attention and MLP projections, with the threshold per layer and per output row.
``minilm``: the held-out embedding cosine to the dense model after the same pruning, and after
recovery by embedding distillation with AdamW alone and wrapped in HAM. Prints one JSON object.
The one-shot methods themselves (Wanda, SparseGPT, ...) are ``sparseham prune``'s; this only checks
that the subjects are sensitive to pruning.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch


def magnitude_(weights: list[torch.Tensor], sparsity: float, per: str) -> None:
    """Zero the smallest |w|: ``sparsity`` of each layer (``per="layer"``) or of each row."""
    with torch.no_grad():
        for w in weights:
            if per == "row":
                k = int(w.shape[1] * sparsity)
                w.scatter_(1, w.abs().topk(k, dim=1, largest=False).indices, 0.0)
            else:
                k = int(w.numel() * sparsity)
                flat = w.view(-1)
                flat[flat.abs().topk(k, largest=False).indices] = 0.0


def _llama(root: str, sparsities: list[float]) -> dict:
    from sparseham.models.hf_io import load_causal_lm
    from sparseham.train.evaluate_run import evaluate_lm, held_out_windows

    model_dir = f"{root}/llama_small/model"
    rows = held_out_windows(model_dir)
    dense = load_causal_lm(model_dir)
    out = {"test_tokens": rows[:, 1:].numel(), "dense": evaluate_lm(dense, rows)["perplexity"]}
    for sparsity in sparsities:
        for per in ("layer", "row"):
            model = copy.deepcopy(dense)
            magnitude_([model.get_parameter(n) for n in model.default_managed], sparsity, per)
            out[f"magnitude_{per}_{sparsity}"] = evaluate_lm(model, rows)["perplexity"]
    return out


def _minilm(root: str, sparsities: list[float], steps: int) -> dict:
    from sparseham.data.sentences import sentence_split
    from sparseham.models.embedding_distill import distill_embeddings, encoder_weights
    from sparseham.models.minilm import embed, embedding_cosine, load_minilm, minilm_dir

    calibration, held_out = sentence_split(1024)
    dense, tok = load_minilm(minilm_dir(root))
    with torch.no_grad():
        reference, targets = embed(dense, tok, held_out), embed(dense, tok, calibration)
    out = {}
    for sparsity in sparsities:
        for per in ("layer", "row"):
            model = copy.deepcopy(dense)
            magnitude_([model.get_parameter(n) for n in encoder_weights(model)], sparsity, per)
            with torch.no_grad():
                out[f"magnitude_{per}_{sparsity}"] = embedding_cosine(embed(model, tok, held_out), reference)
            if per != "row" or sparsity != sparsities[0]:
                continue
            for label, ham in (("adamw", None), ("adamw+ham", {})):
                student, start = copy.deepcopy(model), time.perf_counter()
                losses, manager = distill_embeddings(student, tok, calibration, targets, steps=steps, lr=1e-4,
                                                     ham=ham)
                manager.verify()
                with torch.no_grad():
                    cos = embedding_cosine(embed(student, tok, held_out), reference)
                seconds = round(time.perf_counter() - start, 1)
                out[f"recovered_{label}_{per}_{sparsity}"] = {
                    **cos, "steps": steps, "seconds": seconds, "loss_first": float(losses[0]),
                    "loss_last": float(losses[-1])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("subject", choices=("llama", "minilm"))
    parser.add_argument("--root", default="data")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--steps", type=int, default=100, help="minilm: distillation steps of 32 sentences")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.subject == "llama":
        result = _llama(args.root, args.sparsity)
    else:
        result = _minilm(args.root, args.sparsity, args.steps)
    result.update(seconds=round(time.perf_counter() - start, 1), threads=torch.get_num_threads(),
                  cpu=platform.processor() or platform.machine())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
