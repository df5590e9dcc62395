"""Checkpoint conversion (pretrain/convert.py, launch/convert.py, pretrain/evaluate.py).

Trained checkpoints of the ``debug`` flavor (Engram + mHC) and ``debug-v3`` go to Hugging Face
folders that ``transformers`` loads; logits match ours, DCP -> HF -> DCP is bit-exact, the V4.1
layout round-trips, and bad input is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import load_config
from pretrain.conversion import convert
from pretrain.train import Trainer

transformers = pytest.importorskip("transformers")


def _train(corpus, dump: Path, flavor: str, steps: int = 3, extra=()) -> Path:
    overrides = [
        f"--job.dump_folder={dump}",
        f"--data.dataset_path={corpus}",
        "--data.prepare_if_missing=false",
        "--data.seq_len=64",
        "--data.num_workers=0",
        "--training.batch_size=2",
        f"--training.steps={steps}",
        f"--checkpoint.interval={steps}",
        "--metrics.eval_freq=1000",
        "--metrics.enable_tensorboard=false",
        "--metrics.progress_bar=false",
        "--lr_scheduler.warmup_steps=1",
        f"--model.flavor={flavor}",
        *extra,
    ]
    trainer = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    trainer.fit()
    trainer.loader.close()
    return dump / "checkpoints" / f"step-{steps:08d}"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    return {
        "debug": _train(corpus, root / "debug", "debug"),
        "debug-v3": _train(corpus, root / "v3", "debug-v3", steps=2),
        "v4.1": _train(
            corpus, root / "v41", "debug", steps=2, extra=["--model.overrides.engram.variant=v4.1"]
        ),
    }


def _ours_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    model, args, tok = convert.load_model(ckpt)
    hasher = convert.hasher_for(args, tok)
    engram = None
    if hasher is not None:
        engram = {k: torch.from_numpy(v) for k, v in hasher.hash(ids.numpy()).items()}
    with torch.no_grad():
        return model(ids, engram=engram).logits


def _hf(folder: Path, remote: bool):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=remote, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = convert.DcpCheckpoint(a), convert.DcpCheckpoint(b)
    ea, eb = ca.entries(), cb.entries()
    assert set(ea) == set(eb)
    for name, entry in ea.items():
        assert entry == eb[name], name
        assert torch.equal(ca.read(name, entry), cb.read(name, eb[name])), name


def test_engram_export_loads_in_transformers_with_our_logits(trained, tmp_path):
    out = convert.dcp_to_hf(trained["debug"], tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "modeling_engram.py"} <= names
    assert "tokenizer.model" in names and not any(n.endswith(".tmp") for n in names)
    config = json.loads((out / "config.json").read_text())
    spec = config["engram"]["hash"]  # the hasher rebuilds from this alone
    for key in ("multipliers", "primes", "compressed_map_sha256", "tokenizer_identity"):
        assert spec[key], key
    ids = torch.randint(3, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = _hf(out, remote=True)(ids, use_cache=False).logits
    ours = _ours_logits(trained["debug"], ids)
    assert (theirs - ours).abs().max().item() < 1e-5


@pytest.mark.parametrize("flavor", ["debug", "debug-v3"])  # GQA + Engram; MLA (latent cache)
def test_incremental_decoding_matches_a_full_forward_at_every_step(trained, tmp_path, flavor):
    out = convert.dcp_to_hf(trained[flavor], tmp_path / "hf", layout="engram")
    model = _hf(out, remote=True)
    prompt = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert tokens.shape[1] == prompt.shape[1] + 10
        for end in range(prompt.shape[1], tokens.shape[1]):
            full = model(tokens[:, :end], use_cache=False).logits[:, -1]
            assert torch.equal(full.argmax(-1), tokens[:, end]), end
        # a cached continuation gives the logits of the full forward
        first = model(tokens[:, :12], use_cache=True)
        rest = model(tokens[:, 12:], past_key_values=first.past_key_values, use_cache=True)
        full = model(tokens, use_cache=False).logits[:, 12:]
    assert (rest.logits - full).abs().max().item() < 1e-5


def test_native_deepseek_v3_export_matches_our_logits(trained, tmp_path):
    out = convert.dcp_to_hf(trained["debug-v3"], tmp_path / "hf")  # auto: native
    assert not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["n_group"] == 2
    model = _hf(out, remote=False)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = model(ids).logits
    assert (theirs - _ours_logits(trained["debug-v3"], ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("flavor", ["debug", pytest.param("debug-v3", marks=pytest.mark.slow)])
def test_dcp_hf_dcp_round_trip_is_bit_exact(trained, tmp_path, monkeypatch, flavor):
    from pretrain.conversion import dcp_stream

    monkeypatch.setattr(dcp_stream, "BLOCK_BYTES", 4096)  # many blocks per tensor
    hf = convert.dcp_to_hf(trained[flavor], tmp_path / "hf", max_shard_bytes=200_000)
    assert len(list(hf.glob("model-*.safetensors"))) > 1
    back = convert.hf_to_dcp(hf, tmp_path / "back")
    _assert_same_checkpoint(trained[flavor], back)


def test_a_job_starts_from_the_converted_weights(trained, corpus, tmp_path):
    hf = convert.dcp_to_hf(trained["debug"], tmp_path / "hf")
    back = convert.hf_to_dcp(hf, tmp_path / "back")
    overrides = [
        f"--job.dump_folder={tmp_path / 'job'}",
        f"--data.dataset_path={corpus}",
        "--data.prepare_if_missing=false",
        "--data.seq_len=64",
        "--data.num_workers=0",
        f"--checkpoint.initial_load_path={back}",
        "--metrics.enable_tensorboard=false",
    ]
    trainer = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    model, _, _ = convert.load_model(trained["debug"])
    expected = model.state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    trainer.loader.close()


def test_evaluate_prints_the_loss_transformers_gives(trained, tmp_path, capsys):
    from launch.evaluate import main

    text = tmp_path / "doc.txt"
    text.write_text(Path(json.__file__).read_text()[:200])
    assert main(["--checkpoint", str(trained["debug"]), "--text", str(text)]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    hf = _hf(convert.dcp_to_hf(trained["debug"], tmp_path / "hf"), remote=True)
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "hf" / "tokenizer.model")
    ids = torch.tensor(tok.encode(text.read_text()) + [tok.eos_id])
    assert int(printed["tokens"]) == ids.numel() and ids.numel() <= 128  # one window
    with torch.no_grad():
        loss = hf(ids[None], labels=ids[None], use_cache=False).loss.item()
    assert abs(float(printed["loss"]) - loss) < 1e-5
    np.save(tmp_path / "ids.npy", ids.numpy())
    assert main(["--checkpoint", str(trained["debug"]), "--ids", str(tmp_path / "ids.npy")]) == 0
    again = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert again == printed


def test_v41_layout_round_trip_is_exact(trained, tmp_path):
    v41 = convert.dcp_to_v41(trained["v4.1"], tmp_path / "v41")
    config = json.loads((v41 / "config.json").read_text())
    assert config["engram_max_ngram_size"] == 3 and config["engram_pad_id"] >= 0
    from models.hf.safetensors_io import SafetensorsFolder

    st = SafetensorsFolder(v41)
    ours, _, _ = convert.load_model(trained["v4.1"])
    engram = ours.layers["0"].engram
    assert torch.equal(st.read("layers.0.engram.embed.weight"), engram.table.weight)
    assert torch.equal(st.read("layers.0.engram.wkv.weight"), engram.kv_proj.weight)
    keys = torch.stack([n.weight for n in engram.key_norms])
    assert torch.equal(st.read("layers.0.engram.k_weight"), keys)
    back = convert.v41_to_dcp(v41, trained["v4.1"], tmp_path / "back")
    _assert_same_checkpoint(trained["v4.1"], back)
    # bf16: a bf16 folder read back and written again is the same folder
    bf16 = convert.dcp_to_v41(trained["v4.1"], tmp_path / "bf16", dtype=torch.bfloat16)
    again = convert.dcp_to_v41(
        convert.v41_to_dcp(bf16, trained["v4.1"], tmp_path / "back16"),
        tmp_path / "bf16_again",
        dtype=torch.bfloat16,
    )
    a, b = SafetensorsFolder(bf16), SafetensorsFolder(again)
    assert set(a.names()) == set(b.names())
    for name in a.names():
        assert a.entry(name).dtype == torch.bfloat16 and torch.equal(a.read(name), b.read(name))


def test_v41_fp8_round_trip_stays_within_the_e4m3_bound(trained, tmp_path):
    from models.hf import fp8
    from models.hf.safetensors_io import SafetensorsFolder

    v41 = convert.dcp_to_v41(trained["v4.1"], tmp_path / "v41", fp8=True)
    st = SafetensorsFolder(v41)
    assert st.entry("layers.0.engram.embed.weight").dtype == torch.float8_e4m3fn
    assert st.entry("layers.0.engram.embed.scale").dtype == torch.float8_e8m0fnu
    rows, dh = st.entry("layers.0.engram.embed.weight").shape
    assert st.entry("layers.0.engram.embed.scale").shape == (rows, -(-dh // 32))
    back = convert.v41_to_dcp(v41, trained["v4.1"], tmp_path / "back")
    a, b = convert.load_model(trained["v4.1"])[0], convert.load_model(back)[0]
    engram_a, engram_b = a.layers["0"].engram, b.layers["0"].engram
    for name, quantize, blocks in (
        ("table", fp8.quantize_rows, False),
        ("kv_proj", fp8.quantize_blocks, True),
    ):
        x = getattr(engram_a, name).weight.detach()
        y = getattr(engram_b, name).weight.detach()
        _, scale = quantize(x)
        s = scale.float().repeat_interleave(32, dim=1)
        if blocks:
            s = s.repeat_interleave(32, dim=0)
        s = s[: x.shape[0], : x.shape[1]]
        assert ((y - x).abs() <= fp8.error_bound(x, s)).all(), name
        assert not torch.equal(x, y)  # it was quantised
    assert torch.equal(a.layers["0"].engram.key_norms[0].weight, engram_b.key_norms[0].weight)


def test_reference_weights_load_and_match_the_reference_output(tmp_path):
    from data.tokenizer import deepseek_v3_tokenizer_path
    from models.flavors import get_flavor
    from models.transformer import build_model
    from tests.test_engram_parity import MODULE_CASES, _assert_close, _load, _spec

    case = MODULE_CASES[0]
    config, expected, inputs = _load(case)
    args = get_flavor("debug")
    e, backbone = config["engram"], config["backbone"]
    layers = max(e["layer_ids"]) + 1
    args.dim, args.hc_mult, args.num_layers = backbone["hidden_size"], backbone["hc_mult"], layers
    args.engram.hash = _spec(e)
    args.engram.n_embed_per_ngram, args.engram.kernel_size = (
        e["n_embed_per_ngram"],
        e["kernel_size"],
    )
    tok = deepseek_v3_tokenizer_path()
    base = convert.save_model(build_model(args), args, tok, tmp_path / "base", "init")
    out = convert.reference_to_dcp(case / "weights.npz", base, tmp_path / "out")
    model, _, _ = convert.load_model(out)
    hidden = torch.from_numpy(inputs["hidden_states"])
    for layer in e["layer_ids"]:
        ids = torch.from_numpy(expected[f"layer{layer}.hash_ids"])
        with torch.no_grad():
            output = model.layers[str(layer)].engram(hidden, ids)
        _assert_close(output, expected[f"layer{layer}.output"], f"layer {layer}")
    # everything else is the base's
    base_model, _, _ = convert.load_model(base)
    assert torch.equal(model.output.weight, base_model.output.weight)
    # the embedding (129,280 rows) is larger than the tokenizer (128,815 ids): the export's
    # compressed map covers the tokenizer
    hf = _hf(convert.dcp_to_hf(out, tmp_path / "hf"), remote=True)
    ids = torch.from_numpy(inputs["input_ids"][:, :24])
    with torch.no_grad():
        theirs = hf(ids, use_cache=False).logits
    assert (theirs - _ours_logits(out, ids)).abs().max().item() < 1e-5


# ----- errors -----------------------------------------------------------------------------------


def test_wrong_direction_and_missing_folders_are_named(trained, tmp_path):
    hf = convert.dcp_to_hf(trained["debug"], tmp_path / "hf")
    with pytest.raises(convert.ConversionError, match="use hf-to-dcp"):
        convert.dcp_to_hf(hf, tmp_path / "x")
    with pytest.raises(convert.ConversionError, match="use dcp-to-hf"):
        convert.hf_to_dcp(trained["debug"], tmp_path / "y")
    with pytest.raises(convert.ConversionError, match="not a DCP checkpoint"):
        convert.dcp_to_hf(tmp_path, tmp_path / "z")
    with pytest.raises(convert.ConversionError, match="exists and is not empty"):
        convert.dcp_to_hf(trained["debug"], hf)


def test_partial_folders_are_refused(trained, tmp_path):
    from models.hf.safetensors_io import SafetensorsError

    hf = convert.dcp_to_hf(trained["debug"], tmp_path / "hf", max_shard_bytes=300_000)
    shards = sorted(hf.glob("model-*.safetensors"))
    truncated = tmp_path / "truncated"
    shutil.copytree(hf, truncated)
    data = shards[0].read_bytes()
    (truncated / shards[0].name).write_bytes(data[: len(data) // 2])
    with pytest.raises(SafetensorsError, match="truncated"):
        convert.hf_to_dcp(truncated, tmp_path / "a")
    missing = tmp_path / "missing"
    shutil.copytree(hf, missing)
    (missing / shards[-1].name).unlink()
    with pytest.raises(SafetensorsError, match="is missing"):
        convert.hf_to_dcp(missing, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unknown_and_missing_tensors_are_refused(trained, tmp_path):
    hf = convert.dcp_to_hf(trained["debug"], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["engram_pretrain"]["model_args"]["num_layers"] = 3  # a layer the folder lacks
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.ConversionError, match=r"missing \d+ tensors"):
        convert.hf_to_dcp(broken, tmp_path / "a")
    config["engram_pretrain"]["model_args"]["num_layers"] = 1  # the folder has a layer too many
    config["engram_pretrain"]["model_args"]["num_dense_layers"] = 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.ConversionError, match=r"unknown tensors"):
        convert.hf_to_dcp(broken, tmp_path / "b")


def test_another_tokenizer_or_hash_configuration_is_refused(trained, tmp_path):
    from data.tokenizer import deepseek_v3_tokenizer_path

    with pytest.raises(convert.ConversionError, match="another tokenizer revision"):
        convert.dcp_to_hf(
            trained["debug"], tmp_path / "a", tokenizer=str(deepseek_v3_tokenizer_path())
        )
    hf = convert.dcp_to_hf(trained["debug"], tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["engram"]["hash"]["seed"] = 1
    config["engram_pretrain"]["model_args"]["engram"]["hash"]["seed"] = 0
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.ConversionError, match=r"hash configuration \(differs in: .*seed"):
        convert.hf_to_dcp(hf, tmp_path / "b")
    v41 = convert.dcp_to_v41(trained["v4.1"], tmp_path / "v41")
    with pytest.raises(convert.ConversionError, match="v4.1 Engram layers"):
        convert.v41_to_dcp(v41, trained["debug"], tmp_path / "c")


def test_native_export_of_an_engram_flavor_is_refused(trained, tmp_path):
    with pytest.raises(convert.ConversionError, match="Engram layers.*hc_mult=2"):
        convert.dcp_to_hf(trained["debug"], tmp_path / "a", layout="deepseek_v3")
    assert not (tmp_path / "a").exists()


def test_an_interrupted_conversion_leaves_no_output(trained, tmp_path, monkeypatch):
    from models.hf import safetensors_io

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io.os, "fsync", fail)
    with pytest.raises(KeyboardInterrupt):
        convert.dcp_to_hf(trained["debug"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_cli_reports_bad_input_in_one_line(trained, tmp_path, capsys):
    from launch.convert import main

    hf = tmp_path / "hf"
    assert main(["dcp-to-hf", "--checkpoint", str(trained["debug-v3"]), "--out", str(hf)]) == 0
    assert (hf / "config.json").is_file()
    code = main(["dcp-to-hf", "--checkpoint", str(hf), "--out", str(tmp_path / "x")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "hf-to-dcp" in last


def test_v41_settings_are_configs():
    from data.ngram_hash import EngramHashSpec
    from models.flavors import get_flavor, v41_flash_engram
    from models.transformer import build_model

    flash = v41_flash_engram()
    assert (flash.max_ngram_size, flash.head_dim, flash.gate_norm_eps) == (4, 256, 1e-20)
    assert flash.document_reset and flash.variant == "v4.1"
    rows = EngramHashSpec.from_dict(flash.hash.to_dict()).num_rows(1)
    assert 383e6 < rows < 385e6  # "two tables of about 384 M rows"
    args = get_flavor("debug-v41")
    model = build_model(args)
    assert model.layers["0"].engram.key_norms[0].eps == 1e-20
    assert model.layers["0"].engram.table.weight.shape[1] == 256
    ids = torch.randint(0, 1000, (2, 16))
    hash_ids = torch.randint(0, 2003, (2, 16, args.engram.num_heads))
    assert model(ids, engram={0: hash_ids}).logits.isfinite().all()


def test_a_continuation_job_loads_weights_and_optimizer_and_starts_afresh(
    trained, corpus, tmp_path
):
    run = trained["debug"].parent  # the run's checkpoint folder: its newest step is used
    overrides = [
        f"--job.dump_folder={tmp_path / 'job'}",
        f"--data.dataset_path={corpus}",
        "--data.prepare_if_missing=false",
        "--data.seq_len=96",  # longer than the original 64
        "--data.num_workers=0",
        f"--checkpoint.initial_load_path={run}",
        "--checkpoint.initial_load_model_only=false",
        "--model.overrides.yarn.factor=2.0",
        "--model.overrides.yarn.original_max_position_embeddings=64",
        "--metrics.enable_tensorboard=false",
    ]
    trainer = Trainer(load_config("pretrain/configs/debug.toml", overrides))
    assert trainer.step == 0  # a fresh schedule and data state
    import torch.distributed.checkpoint as dcp

    from pretrain.checkpoint import _state

    state = _state(trainer.model, trainer.optimizers, blocked=False)
    loaded = {k: v for k, v in state.items() if k.startswith("optim")}
    saved = {
        name: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.items()}
        for name, opt in loaded.items()
    }
    dcp.load(saved, checkpoint_id=str(trained["debug"]))
    moments = [
        (name, k) for name, opt in loaded.items() for k in opt if k.endswith(("exp_avg", "_sq"))
    ]
    assert len(moments) > 10 and any(".table." in k for _, k in moments)
    for name, key in moments:
        assert loaded[name][key].abs().sum() > 0, key  # trained moments, not fresh zeros
        assert torch.equal(loaded[name][key], saved[name][key]), key
    trainer.loader.close()
    # a converted checkpoint holds weights only
    back = convert.hf_to_dcp(convert.dcp_to_hf(trained["debug"], tmp_path / "hf"), tmp_path / "b")
    overrides[5] = f"--checkpoint.initial_load_path={back}"
    overrides[0] = f"--job.dump_folder={tmp_path / 'job2'}"
    with pytest.raises(ValueError, match="initial_load_model_only=false"):
        Trainer(load_config("pretrain/configs/debug.toml", overrides))


@pytest.mark.parametrize("flavor", ["debug", "debug-v3"])
def test_incremental_decoding_cli_logits_equal_our_full_forward_at_every_step(
    trained, flavor, capsys
):
    """Generation runs on our own model and its KVCache: every step's logits equal a full
    forward of the sequence so far."""
    from launch.generate import main
    from pretrain.inference.generate import generate

    model, args, tok_path = convert.load_model(trained[flavor])
    hasher = convert.hasher_for(args, tok_path)
    prompt = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(5))
    steps: list[torch.Tensor] = []
    tokens = generate(model, hasher, prompt, 8, logits_out=steps)
    assert tokens.shape[1] == prompt.shape[1] + 8 and len(steps) == 8
    for step, logits in enumerate(steps):
        prefix = tokens[:, : prompt.shape[1] + step]
        engram = None
        if hasher is not None:
            engram = {k: torch.from_numpy(v) for k, v in hasher.hash(prefix.numpy()).items()}
        with torch.no_grad():
            ours = model(prefix, engram=engram).logits[:, -1]
        assert (logits - ours).abs().max().item() < 1e-5, step
        assert torch.equal(logits.argmax(-1), tokens[:, prompt.shape[1] + step])
    sampled = [
        generate(model, hasher, prompt, 8, temperature=1.0, top_p=0.9, seed=s) for s in (0, 0, 1)
    ]
    assert torch.equal(sampled[0], sampled[1]) and sampled[0].shape == tokens.shape
    assert (
        main(["--checkpoint", str(trained[flavor]), "--prompt", "def f", "--max_new_tokens", "4"])
        == 0
    )
    assert capsys.readouterr().out.startswith("def f")


def test_analyze_cli_writes_what_the_library_computes(trained, tmp_path, capsys):
    """``launch.analyze logit_lens`` and ``gates`` on a checkpoint write the numbers the library
    functions give on the same windows, and a missing argument is one line."""
    from launch.analyze import main
    from pretrain.inference import analyze

    text = tmp_path / "doc.txt"
    text.write_text(Path(json.__file__).read_text()[:3000])
    ckpt = str(trained["debug"])
    out = tmp_path / "lens"
    argv = ["logit_lens", "--checkpoint", ckpt, "--text", str(text), "--out", str(out)]
    assert main([*argv, "--windows", "2"]) == 0
    written = json.loads((out / "logit_lens.json").read_text())
    model, args, tok_path = convert.load_model(trained["debug"])
    wins = analyze.windows(analyze.text_ids([text], tok_path), args.max_seq_len, 2)
    want = analyze.logit_lens(model, convert.hasher_for(args, tok_path), wins)
    assert list(written.values()) == [pytest.approx(want, abs=1e-6)]
    gates = ["gates", "--checkpoint", ckpt, "--text", str(text), "--out", str(tmp_path / "g")]
    assert main(gates) == 0
    got = json.loads((tmp_path / "g" / "gates.json").read_text())["gates"]
    direct = analyze.gate_values(model, convert.hasher_for(args, tok_path), wins[0])
    assert sorted(int(k) for k in got) == sorted(direct)
    for layer, values in direct.items():
        assert np.allclose(np.asarray(got[str(layer)]), values, atol=1e-6), layer
    capsys.readouterr()
    assert main(["cka", "--checkpoint", ckpt, "--text", str(text), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: cka compares two checkpoints: pass --checkpoint twice"
    )


_LOAD_ALONE = """
import sys
for name in ("models", "data", "pretrain", "parallel", "launch"):
    sys.modules[name] = None  # the folder's own files must be all the model code it runs
import torch, transformers
ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(3))
out = []
for folder in sys.argv[1:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        out.append(model(ids, use_cache=False).logits)
torch.save(out, sys.argv[1] + "/../logits.pt")
"""


def test_the_export_carries_the_model_source_and_follows_a_change(trained, tmp_path, monkeypatch):
    """The remote code is the framework's own files (nothing restated): a line changed in
    models/ reaches the next export, and the folder runs with no project package importable."""
    import subprocess
    import sys

    from models.hf import remote_code

    files = remote_code.remote_code_modules()
    assert {"transformer.py", "attention.py", "engram.py", "kv_cache.py", "ngram_hash.py"} <= set(
        files
    )
    first = convert.dcp_to_hf(trained["debug"], tmp_path / "first", layout="engram")
    for name, path in files.items():
        text = (first / name).read_text()
        assert "from models." not in text and "from data." not in text, name
        assert text == remote_code.relative_source(path), name
    copy = tmp_path / "repo"
    for package in ("models", "data"):
        shutil.copytree(remote_code.REPO / package, copy / package)
    source = copy / "models" / "transformer.py"
    line = "logits = self.output(self.norm(self.merge(x)))"
    assert line in source.read_text()
    source.write_text(source.read_text().replace(line, "logits = 2 * " + line.split(" = ")[1]))
    monkeypatch.setattr(remote_code, "REPO", copy)
    monkeypatch.setattr(remote_code, "GLUE", copy / "models" / "hf" / "modeling_engram.py")
    second = convert.dcp_to_hf(trained["debug"], tmp_path / "second", layout="engram")
    assert "logits = 2 * self.output" in (second / "transformer.py").read_text()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", _LOAD_ALONE, str(first), str(second)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    base, doubled = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(doubled, 2 * base, atol=1e-5) and base.abs().max() > 0
