"""``python -m launch.lm_eval --model engram --model_args checkpoint=DIR --tasks T [lm-eval args]``

lm-eval's own command line with our checkpoints as a model: this registers ``engram``
(``pretrain.downstream.lm_eval_adapter.EngramLM``: a DCP checkpoint, no conversion) and hands
every argument to lm-eval 0.4.13's CLI, which has no plugin entry point of its own. Other models
(``--model hf`` on an exported folder) run as they would under ``lm_eval``. Needs the ``[eval]``
extra.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        import lm_eval.__main__ as cli

        import pretrain.downstream.lm_eval_adapter  # noqa: F401  (registers "engram")
    except ImportError as err:
        print(
            f"error: python -m launch.lm_eval needs the [eval] extra (lm-eval): pip install -e "
            f"'.[eval]' ({err})",
            file=sys.stderr,
        )
        return 2
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli.cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
