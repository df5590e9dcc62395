"""Windows of a document and the model's loss on them: what evaluation, the probes and the
analysis tools share (``python -m launch.evaluate`` prints it).

Legend: T window length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.tokenizer import load_tokenizer


def document_ids(text_file: str | None, ids_file: str | None, tokenizer_path: Path) -> np.ndarray:
    if (text_file is None) == (ids_file is None):
        raise ValueError("pass exactly one of --text FILE and --ids FILE.npy")
    if ids_file is not None:
        ids = np.load(ids_file)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"{ids_file}: expected a 1-D integer array, got {ids.dtype}{ids.shape}"
            )
        return ids.astype(np.int64)
    tok = load_tokenizer(tokenizer_path)
    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    return np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int64)  # as data.prepare


def windows(ids: np.ndarray, seq_len: int, limit: int | None = None) -> list[np.ndarray]:
    """Consecutive windows of ``seq_len + 1`` ids (inputs and their next tokens); each is a
    sequence of its own."""
    out = [ids[s : s + seq_len + 1] for s in range(0, max(1, ids.size - 1), seq_len)]
    out = [w for w in out if w.size >= 2]
    return out[:limit] if limit else out


def engram_inputs(hasher, tokens: np.ndarray):
    """The hash ids of ``tokens [T]`` (a batch of one) as the model takes them."""
    if hasher is None:
        return None
    return {k: torch.from_numpy(v) for k, v in hasher.hash(tokens[None]).items()}


def forward_window(model, hasher, window: np.ndarray):
    """The model's output on a window's inputs (all but its last id)."""
    tokens = torch.from_numpy(window[:-1]).unsqueeze(0)
    return model(tokens, engram=engram_inputs(hasher, window[:-1]))


@torch.no_grad()
def windows_loss(model, hasher, wins: list[np.ndarray]) -> float:
    """Mean next-token loss over every prediction of ``wins``."""
    total, count = 0.0, 0
    for window in wins:
        logits = forward_window(model, hasher, window).logits[0].float()
        labels = torch.from_numpy(window[1:])
        total += F.cross_entropy(logits, labels, reduction="sum").item()
        count += labels.numel()
    return total / count


def mean_loss(model, args, hasher, ids: np.ndarray, seq_len: int) -> float:
    if ids.size < 2:
        raise ValueError("the document has fewer than 2 tokens: nothing to predict")
    if ids.max() >= args.vocab_size:
        raise ValueError(f"token id {int(ids.max())} is outside the model's {args.vocab_size}")
    return windows_loss(model, hasher, windows(ids, seq_len))


def text_ids(paths: list[Path], tokenizer_path: Path) -> np.ndarray:
    """The documents of text files (folders: every text file under them, sorted) as one id
    array, each tokenised as ``document_ids`` does."""
    files = []
    for path in paths:
        files += sorted(p for p in path.rglob("*") if _is_text(p)) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no text files under {', '.join(map(str, paths))}")
    return np.concatenate([document_ids(str(f), None, tokenizer_path) for f in files])


def _is_text(path: Path) -> bool:
    """A file of text (folders also hold bytecode caches and the like): no NUL byte up front."""
    if not path.is_file():
        return False
    with open(path, "rb") as handle:
        return b"\0" not in handle.read(4096)
