"""Reference parity: every case folder in tests/engram_reference (or $ENGRAM_PARITY_DIR).

Compressed lookup and hash ids must be exact; outputs and every gradient (table rows included) must
match to float32 rounding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.ngram_hash import EngramHashSpec, NgramHasher
from models.args import EngramConfig
from models.engram import Engram, load_reference_state_dict, reference_state_dict_map
from tests.conftest import parity_cases

CASES = parity_cases()


def _spec(engram: dict) -> EngramHashSpec:
    return EngramHashSpec.from_dict(engram)  # the reference's names are ours


def _load(case):
    config = json.loads((case / "config.json").read_text())
    expected = np.load(case / "expected.npz")
    inputs = np.load(case / "inputs.npz")
    return config, expected, inputs


def _assert_close(actual: torch.Tensor, expected: np.ndarray, what: str) -> None:
    expected_t = torch.from_numpy(np.asarray(expected)).to(actual.dtype)
    assert actual.shape == expected_t.shape, f"{what}: shape {actual.shape} != {expected_t.shape}"
    scale = expected_t.abs().max().clamp_min(1e-12)
    err = ((actual - expected_t).abs().max() / scale).item()
    assert err < 1e-5, f"{what}: relative error {err:.3g}"


def test_parity_cases_present():
    assert CASES, "no parity cases found; set ENGRAM_PARITY_DIR"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hash_parity(case, deepseek_compressed):
    config, expected, inputs = _load(case)
    engram = config["engram"]
    np.testing.assert_array_equal(deepseek_compressed.lookup_table, expected["compressed_lookup"])
    assert len(deepseek_compressed) == int(expected["compressed_vocab_size"])
    hasher = NgramHasher(_spec(engram), deepseek_compressed)
    assert hasher.compressed_pad_id == int(expected["compressed_pad_id"])
    hashed = hasher.hash(inputs["input_ids"])
    for layer in engram["layer_ids"]:
        np.testing.assert_array_equal(
            hasher.multipliers[layer], expected[f"layer{layer}.multipliers"]
        )
        np.testing.assert_array_equal(
            hasher.table_sizes(layer), expected[f"layer{layer}.table_sizes"]
        )
        np.testing.assert_array_equal(hashed[layer], expected[f"layer{layer}.hash_ids"])


MODULE_CASES = [
    c for c in CASES if not json.loads((c / "config.json").read_text()).get("hash_only")
]


@pytest.mark.parametrize("case", MODULE_CASES, ids=[c.name for c in MODULE_CASES])
def test_module_parity(case):
    config, expected, inputs = _load(case)
    weights = np.load(case / "weights.npz")
    backbone = config["backbone"]
    engram = config["engram"]
    cfg = EngramConfig(
        hash=_spec(engram),
        n_embed_per_ngram=engram["n_embed_per_ngram"],
        kernel_size=engram["kernel_size"],
        sparse_grad=True,
    )
    sizes = cfg.table_sizes()
    name_map = reference_state_dict_map(backbone["hc_mult"])
    for layer in cfg.layer_ids:
        module = Engram(cfg, layer, backbone["hidden_size"], backbone["hc_mult"], sizes[layer])
        prefix = f"layer{layer}."
        ref = {
            k[len(prefix) :]: torch.from_numpy(weights[k])
            for k in weights.files
            if k.startswith(prefix)
        }
        load_reference_state_dict(module, ref)
        hidden = torch.from_numpy(inputs["hidden_states"]).clone().requires_grad_(True)
        out = module(hidden, torch.from_numpy(expected[f"{prefix}hash_ids"]))
        (out * torch.from_numpy(inputs["cotangent"])).sum().backward()
        _assert_close(
            out.detach(), expected[f"{prefix}output"], f"{case.name} layer {layer} output"
        )
        _assert_close(hidden.grad, expected[f"{prefix}grad_hidden_states"], "grad hidden")
        params = dict(module.named_parameters())
        for ref_name, our_name in name_map.items():
            if ref_name == "multi_head_embedding.embedding.weight":
                grad = params[our_name].grad.coalesce()
                rows = expected[f"{prefix}grad.{ref_name}.rows"]
                np.testing.assert_array_equal(grad.indices()[0].numpy(), rows)
                _assert_close(
                    grad.values(), expected[f"{prefix}grad.{ref_name}.values"], "table grad"
                )
            else:
                _assert_close(params[our_name].grad, expected[f"{prefix}grad.{ref_name}"], ref_name)
