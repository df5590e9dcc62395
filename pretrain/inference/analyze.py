"""Analysis tools behind the paper's claims, for any checkpoint: LogitLens, CKA, gate maps and
Engram ablation. Library functions take a model and token windows; ``run_analysis`` (the CLI is
``python -m launch.analyze``) loads DCP checkpoints (``pretrain.checkpoint_reader.load_model``)
and writes a JSON and a PNG (plus HTML for gate maps).

Text is tokenised as the loader does (ids, then EOS per file) and cut into windows of
``--seq_len`` tokens (default: the model's ``max_seq_len``), as ``launch.evaluate`` does.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.engram import Engram, GateMonitor
from pretrain.inference.windows import forward_window, text_ids, windows, windows_loss

# ----- inputs -----------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_layers(model):
    """Collect every block's output streams ``[B, T, G, D]`` during the forwards in the block."""
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach()))
        for layer in model.layers.values()
    ]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def engram_ablated(model):
    """Every Engram layer adds zero to the residual streams (the lookup and gate still run)."""
    handles = [
        module.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        for module in model.modules()
        if isinstance(module, Engram)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----- LogitLens --------------------------------------------------------------------------------


@torch.no_grad()
def logit_lens(model, hasher, wins: list[np.ndarray]) -> list[float]:
    """Mean KL(final || layer l) per block: each block's streams read out through the final
    merge, norm and head. The last block's is 0 by construction."""
    totals = None
    count = 0
    for window in wins:
        with capture_layers(model) as outs:
            final = F.log_softmax(forward_window(model, hasher, window).logits.float(), dim=-1)
        kls = []
        for x in outs:
            early = F.log_softmax(model.output(model.norm(model.merge(x))).float(), dim=-1)
            kls.append(F.kl_div(early, final, log_target=True, reduction="sum").item())
        totals = kls if totals is None else [a + b for a, b in zip(totals, kls, strict=True)]
        count += window.size - 1
    return [t / count for t in totals]


# ----- CKA --------------------------------------------------------------------------------------


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations ``[n, d1]``, ``[n, d2]`` of the same n tokens."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm())).item()


@torch.no_grad()
def layer_features(model, hasher, wins: list[np.ndarray]) -> list[torch.Tensor]:
    """Per block, the streams' mean ``[tokens, D]`` over all windows."""
    per_layer: list[list[torch.Tensor]] = []
    for window in wins:
        with capture_layers(model) as outs:
            forward_window(model, hasher, window)
        for i, x in enumerate(outs):
            if len(per_layer) <= i:
                per_layer.append([])
            per_layer[i].append(x.mean(dim=2).flatten(0, 1).float())
    return [torch.cat(chunks) for chunks in per_layer]


def cka_matrix(features_a: list[torch.Tensor], features_b: list[torch.Tensor]) -> list[list[float]]:
    return [[linear_cka(a, b) for b in features_b] for a in features_a]


# ----- gates ------------------------------------------------------------------------------------


@torch.no_grad()
def gate_values(model, hasher, window: np.ndarray) -> dict[int, np.ndarray]:
    """Per Engram layer, the gates ``[T, G]`` of every token and branch."""
    monitor = GateMonitor(model)
    try:
        forward_window(model, hasher, window)
        return {k: v[0, :, :, 0].float().numpy() for k, v in monitor._last.items()}
    finally:
        monitor.remove()


def gate_html(tokens: list[str], gates: dict[int, np.ndarray]) -> str:
    """Tokens coloured by their gate (mean over branches), one paragraph per Engram layer."""
    parts = ["<html><meta charset='utf-8'><body style='font-family:monospace'>"]
    for layer, values in sorted(gates.items()):
        mean = values.mean(axis=1)
        parts.append(f"<h3>Engram layer {layer} (gate mean over branches)</h3><p>")
        for token, g in zip(tokens, mean, strict=True):
            alpha = float(np.clip(g, 0, 1))
            parts.append(
                f"<span title='{g:.3f}' style='background:rgba(255,120,0,{alpha:.2f})'>"
                f"{html.escape(token)}</span>"
            )
        parts.append("</p>")
    parts.append("</body></html>")
    return "".join(parts)


# ----- ablation ---------------------------------------------------------------------------------


def ablation(model, hasher, sources: dict[str, list[np.ndarray]], vocab_size: int) -> dict:
    """Loss per source with and without Engram's output, and the retained fraction of the gain
    over a uniform guess: ``(ln V - ablated) / (ln V - full)``."""
    chance = math.log(vocab_size)
    out = {}
    for name, wins in sources.items():
        full = windows_loss(model, hasher, wins)
        with engram_ablated(model):
            ablated = windows_loss(model, hasher, wins)
        out[name] = {
            "loss": full,
            "loss_engram_ablated": ablated,
            "retained": (chance - ablated) / (chance - full),
            "tokens": int(sum(w.size - 1 for w in wins)),
        }
    return out


# ----- the tools on checkpoints -------------------------------------------------------------------


def short_labels(paths: list[str]) -> list[str]:
    """The parts of checkpoint paths that tell them apart (common leading and trailing folders
    dropped)."""
    parts = [Path(p).parts for p in paths]
    if len(parts) < 2:
        return [Path(p).name for p in paths]
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    return ["/".join(p[head : len(p) - tail]) for p in parts]


def _plot(kind: str, data, out: Path, labels=None) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[analysis]'): no plot written")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if kind == "logit_lens":
        for label, kls in data.items():
            ax.plot(range(len(kls)), kls, marker="o", label=label)
        ax.set_xlabel("block")
        ax.set_ylabel("KL(final || block) per token (nats)")
        ax.legend(fontsize=7)
    elif kind == "cka":
        image = ax.imshow(np.asarray(data), origin="lower", vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(image)
        ax.set_xlabel(f"block of {labels[1]}")
        ax.set_ylabel(f"block of {labels[0]}")
    elif kind == "gates":
        rows = [v[:, g] for _, v in sorted(data.items()) for g in range(v.shape[1])]
        image = ax.imshow(np.stack(rows), aspect="auto", vmin=0, vmax=1, cmap="magma")
        fig.colorbar(image)
        ax.set_xlabel("token")
        ax.set_ylabel("Engram layer x branch")
    fig.tight_layout()
    path = out / f"{kind}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_analysis(
    tool: str,
    checkpoints: list[str],
    out: Path,
    texts: list[str] = (),
    sources: list[str] = (),
    seq_len: int = 0,
    num_windows: int = 16,
) -> tuple[dict, Path | None]:
    """Run ``tool`` (``logit_lens``, ``cka``, ``gates`` or ``ablation``) on DCP checkpoints and
    write its files into ``out``; returns ``(result, plot path or None)``. ``sources``:
    ablation's ``NAME=FILE_OR_DIR`` items. Raises ``ValueError`` naming a missing argument."""
    from data.tokenizer import load_tokenizer
    from pretrain.checkpoint_reader import hasher_for, load_model

    out.mkdir(parents=True, exist_ok=True)
    loaded = [load_model(c) for c in checkpoints]
    if tool == "cka" and len(loaded) != 2:
        raise ValueError("cka compares two checkpoints: pass --checkpoint twice")
    if tool == "ablation" and not sources:
        raise ValueError("ablation needs --source NAME=FILE_OR_DIR (one or more)")
    if tool != "ablation" and not texts:
        raise ValueError(f"{tool} needs --text FILE_OR_DIR")
    model, args, tok = loaded[0]
    seq_len = seq_len or args.max_seq_len
    if tool == "ablation":
        if args.engram is None:
            raise ValueError(f"{checkpoints[0]} has no Engram layers to ablate")
        by_source = {}
        for item in sources:
            name, _, path = item.partition("=")
            by_source[name] = windows(text_ids([Path(path)], tok), seq_len, num_windows)
        result = ablation(model, hasher_for(args, tok), by_source, args.vocab_size)
        png = None
    elif tool == "gates":
        if args.engram is None:
            raise ValueError(f"{checkpoints[0]} has no Engram layers")
        window = windows(text_ids([Path(t) for t in texts], tok), seq_len, 1)[0]
        gates = gate_values(model, hasher_for(args, tok), window)
        pieces = [load_tokenizer(tok).decode_single(int(i)) for i in window[:-1]]
        (out / "gates.html").write_text(gate_html(pieces, gates))
        result = {"tokens": pieces, "gates": {k: v.tolist() for k, v in gates.items()}}
        png = _plot("gates", gates, out)
    else:
        ids = text_ids([Path(t) for t in texts], tok)
        wins = windows(ids, seq_len, num_windows)
        if tool == "logit_lens":
            names = short_labels(checkpoints)
            result = {
                c: logit_lens(m, hasher_for(a, t), wins)
                for c, (m, a, t) in zip(names, loaded, strict=True)
            }
            png = _plot("logit_lens", result, out)
        else:
            feats = [layer_features(m, hasher_for(a, t), wins) for m, a, t in loaded]
            result = {"a": checkpoints[0], "b": checkpoints[1]}
            result["cka"] = cka_matrix(*feats)
            png = _plot("cka", result["cka"], out, labels=short_labels(checkpoints))
    (out / f"{tool}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result, png
