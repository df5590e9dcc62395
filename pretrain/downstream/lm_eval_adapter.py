"""Our checkpoints as an lm-eval model (``--model engram``), with no conversion.

``EngramLM`` loads a DCP checkpoint with the model that trained it and answers lm-eval's three
request types: ``loglikelihood`` (batched, right-padded rows, one request per row),
``loglikelihood_rolling`` (lm-eval's own disjoint rolling windows over the model's
``max_seq_len``) and ``generate_until`` (greedy, through the model's decoding cache). lm-eval
0.4.13 has no plugin entry point, so ``python -m launch.lm_eval`` imports this module (which
registers the name) before it hands over to lm-eval's CLI; from Python,
``lm_eval.simple_evaluate(model=EngramLM(checkpoint=...), ...)``.

Tokenisation follows lm-eval's causal convention (``TemplateLM._encode_pair``: the context and
continuation are encoded together and split), with the run's own tokenizer; an empty context is
conditioned on EOS, the token before every document in training.

Legend: B rows, L row length, V vocab.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models: registered beside ours)
import numpy as np
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from data.tokenizer import load_tokenizer
from pretrain.checkpoint_reader import hasher_for, load_model


@register_model("engram")
class EngramLM(TemplateLM):
    """lm-eval's model API over a DCP checkpoint (one process, CPU or one GPU).

    Args:
        checkpoint: a DCP step folder or a run's checkpoints folder.
        batch_size: rows per forward.
        max_length: the longest row (default: the model's ``max_seq_len``).
        tokenizer: the tokenizer file, when not where it was trained.
        device: ``cpu`` or ``cuda``.
    """

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str = 4,
        max_length: int | None = None,
        tokenizer: str | None = None,
        device: str = "cpu",
        **kwargs,
    ):
        super().__init__()
        model, args, tok_path = load_model(checkpoint, tokenizer=tokenizer)
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.args, self.tok = args, load_tokenizer(tok_path)
        self.hasher = hasher_for(args, tok_path)
        self.batch_size = 1 if str(batch_size) == "auto" else int(batch_size)
        self.max_length = int(max_length or args.max_seq_len)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(list(tokens))

    # ----- scoring ------------------------------------------------------------------------------

    @torch.no_grad()
    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``(context ids, continuation ids)`` -> ``(sum of the continuation's log-probs,
        whether greedy decoding gives it)``, each pair one row from position 0."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            full = [(ctx + cont)[-(self.max_length + 1) :] for ctx, cont in chunk]
            length = max(len(ids) - 1 for ids in full)
            tokens = np.full((len(chunk), length), self.tok.eos_id, dtype=np.int64)
            for row, ids in enumerate(full):
                tokens[row, : len(ids) - 1] = ids[:-1]
            engram = None
            if self.hasher is not None:
                hashed = self.hasher.hash(tokens)
                engram = {k: torch.from_numpy(v).to(self._device) for k, v in hashed.items()}
            inputs = torch.from_numpy(tokens).to(self._device)
            logits = self.model(inputs, engram=engram).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for row, ((_, cont), ids) in enumerate(zip(chunk, full, strict=True)):
                where = torch.arange(len(ids) - 1 - len(cont), len(ids) - 1)
                target = torch.tensor(cont)
                scores = logp[row, where]
                total = float(scores.gather(-1, target[:, None]).sum())
                out.append((total, bool((scores.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        rows = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        results = self._score_rows(rows)
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (req.args for req in requests):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            total = sum(ll for ll, _ in self._score_rows([(list(a), list(b)) for a, b in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ----- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from pretrain.inference.generate import generate

        out = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - 1) :]
            prompt = torch.tensor([ids], device=self._device)
            room = min(max_new, self.max_length - len(ids))
            tokens = generate(self.model, self.hasher, prompt, room, eos_id=self.tok.eos_id)
            new = [t for t in tokens[0, len(ids) :].tolist() if t != self.tok.eos_id]
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
