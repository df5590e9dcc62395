"""Checkpoint conversion: DCP <-> Hugging Face folders, reference and DeepSeek-V4.1 Engram layouts.

Every conversion streams (``pretrain/conversion/dcp_stream.py``): a tensor is read and written
in row blocks of about ``BLOCK_BYTES``, so memory holds a few blocks whatever the checkpoint's
size. DCP checkpoints are read through DCP at any layout they were saved at (every key is a
global tensor; tables are row blocks), and written through ``RowBlocks`` whose source reads the
input lazily.
Outputs are built in ``<out>.tmp`` and renamed when complete: an interrupted conversion leaves no
folder under the output's name.

Name maps live with the layouts: ``models.hf.layouts``; the remote code is made by
``models.hf.remote_code``. The command line is ``launch/convert.py``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from data.ngram_hash import NgramHasher, hash_config_mismatches
from data.tokenizer import load_tokenizer
from models.args import ModelArgs, model_args_from_dict, model_args_to_dict
from models.hf.layouts import Source, cast, constant
from models.hf.remote_code import write_remote_code
from models.hf.safetensors_io import SafetensorsFolder, write_folder
from models.spec import get_model_spec
from pretrain.checkpoint_reader import (  # noqa: F401 - the conversion API re-exports these
    DcpCheckpoint,
    hasher_for,
    load_model,
)
from pretrain.conversion.dcp_stream import (  # noqa: F401 - the conversion API re-exports these
    BLOCK_BYTES,
    ConversionError,
    atomic_folder,
    pieces_of,
    progress_bar,
    save_dcp,
)

log = logging.getLogger(__name__)


# ----- identity: tokenizer and hash configuration -----------------------------------------------


def check_tokenizer(tokenizer_path: Path, identity: str | None, where: str) -> None:
    """Refuse a tokenizer file other than the one ``where`` was made with."""
    found = load_tokenizer(tokenizer_path).identity
    if identity and found != identity:
        raise ConversionError(
            f"tokenizer {tokenizer_path} ({found}) is not the one {where} was made with "
            f"({identity}): another tokenizer revision changes the Engram compressed map and "
            "every hash id; use the original tokenizer file"
        )


def check_hash_config(saved: dict | None, hasher: NgramHasher | None, where: str) -> None:
    if hasher is None and saved is None:
        return
    current = hasher.to_config_dict() if hasher is not None else None
    fields = hash_config_mismatches(saved or {}, current or {})
    if fields:
        raise ConversionError(
            f"{where} was made with another Engram hash configuration (differs in: "
            f"{', '.join(fields)}); its tables would be read with the wrong ids. Convert with the "
            "tokenizer and model settings it was trained with"
        )


def checkpoint_meta(args: ModelArgs, hasher, tokenizer_path: Path, source: str) -> dict:
    """``meta.json`` of a converted DCP checkpoint (step 0, one rank)."""
    return {
        "step": 0,
        "world_size": 1,
        "tokenizer_identity": load_tokenizer(tokenizer_path).identity,
        "tokenizer_path": str(Path(tokenizer_path).resolve()),
        "engram_hash": hasher.to_config_dict() if hasher is not None else None,
        "model_args": model_args_to_dict(args),
        "converted_from": source,
    }


def expect_names(found: set[str], expected: set[str], where: str) -> None:
    """Refuse unknown or missing tensors, naming a few of each."""
    unknown, missing = sorted(found - expected), sorted(expected - found)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors ({', '.join(missing[:4])})")
        if unknown:
            parts.append(f"{len(unknown)} unknown tensors ({', '.join(unknown[:4])})")
        raise ConversionError(
            f"{where}: {'; '.join(parts)}. The checkpoint does not match the model it describes "
            "(another flavor or overrides, or a partial export)"
        )


# ----- conversions ------------------------------------------------------------------------------

LAYOUTS = ("auto", *get_model_spec("deepseek_engram").export_layouts)  # the family converted
TOKENIZER_FILES = {".json": "tokenizer.json", ".model": "tokenizer.model"}


def _sources(entries, read_rows, read) -> dict[str, Source]:
    """Sources of ``entries``: ``read_rows(entry, a, b)`` for tensors with rows, ``read(entry)``
    for scalars (whose one row is the value)."""
    sources = {}
    for entry in entries:
        if entry.shape:
            sources[entry.name] = Source(entry, lambda a, b, e=entry: read_rows(e, a, b))
        else:
            sources[entry.name] = Source(entry, lambda a, b, e=entry: read(e).reshape(1))
    return sources


def _dcp_sources(ckpt: DcpCheckpoint) -> dict[str, Source]:
    return _sources(
        ckpt.entries().values(),
        lambda e, a, b: ckpt.read_rows(e.name, a, b, e),
        lambda e: ckpt.read(e.name, e),
    )


def _folder_sources(folder: SafetensorsFolder) -> dict[str, Source]:
    return _sources(
        [folder.entry(n) for n in folder.names()],
        lambda e, a, b: folder.read_rows(e.name, a, b),
        lambda e: folder.read(e.name),
    )


def _expected_names(args: ModelArgs) -> set[str]:
    """Our state-dict names of ``args`` (built on meta: nothing is allocated)."""
    from models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    return set(model.state_dict())


def _write_hf(
    out: Path, sources: dict[str, Source], config: dict, max_shard_bytes: int, what: str
) -> None:
    entries = [s.entry for s in sources.values()]
    total = sum(e.nbytes for e in entries)
    with progress_bar(total, what) as bar:
        write_folder(
            out,
            entries,
            lambda entry: pieces_of(sources[entry.name]),
            max_shard_bytes=max_shard_bytes,
            metadata={"format": "pt"},
            progress=bar.update,
        )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def dcp_to_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    layout: str = "auto",
    tokenizer: str | None = None,
    config: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
) -> Path:
    """A DCP checkpoint (any layout it was saved at) as a Hugging Face folder.

    ``layout``: ``engram`` (remote code, any flavor), ``deepseek_v3`` (native, flavors without
    Engram or mHC such as ``debug-v3``), or ``auto`` (native when the flavor allows it).
    """
    from models.hf import layouts

    if layout not in LAYOUTS:
        raise ConversionError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    ckpt = DcpCheckpoint(checkpoint)
    args = ckpt.model_args(config)
    tok_path = ckpt.tokenizer_path(tokenizer)
    check_tokenizer(tok_path, ckpt.meta.get("tokenizer_identity"), str(ckpt.path))
    hasher = hasher_for(args, tok_path)
    check_hash_config(ckpt.meta.get("engram_hash"), hasher, str(ckpt.path))
    ours = _dcp_sources(ckpt)
    expect_names(set(ours), _expected_names(args), str(ckpt.path))
    reasons = layouts.v3_unsupported(args)
    if layout == "auto":
        layout = "deepseek_v3" if not reasons else "engram"
    tok = load_tokenizer(tok_path)
    if layout == "deepseek_v3":
        if reasons:
            raise ConversionError(
                "this model cannot be a native DeepseekV3ForCausalLM: "
                + "; ".join(reasons)
                + ". Use --layout engram (remote code)"
            )
        hf, hf_config = layouts.to_v3(ours), layouts.v3_config(args, tok)
    else:
        lookup = hasher.compressed_tokenizer.lookup_table if hasher is not None else None
        hash_config = hasher.to_config_dict() if hasher is not None else None
        hf = layouts.to_engram_hf(ours, lookup)
        hf_config = layouts.engram_hf_config(args, hash_config, tok)
    hf = {name: layouts.cast(src, dtype) for name, src in hf.items()}
    hf_config["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
    hf_config["engram_pretrain"] = {
        "model_args": model_args_to_dict(args),
        "tokenizer_identity": tok.identity,
        "source_checkpoint": str(ckpt.path),
        "step": ckpt.meta.get("step"),
    }
    with atomic_folder(out, overwrite) as tmp:
        _write_hf(tmp, hf, hf_config, max_shard_bytes, "dcp-to-hf")
        shutil.copyfile(tok_path, tmp / TOKENIZER_FILES[tok_path.suffix])
        (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2))
        if layout == "engram":
            write_remote_code(tmp)
    log.info("wrote %s (%s layout)", out, layout)
    return Path(out)


def _tokenizer_config(tok) -> dict:
    special = {}
    for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if token_id is not None and token_id >= 0:
            special[key] = tok.token_string(token_id)
    if Path(tok.path).suffix == ".json":
        return {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, **special}


def _hf_folder(folder: str | Path) -> tuple[SafetensorsFolder, dict, Path]:
    folder = Path(folder)
    if (folder / ".metadata").is_file() or any(folder.glob("step-*")):
        raise ConversionError(
            f"{folder} is a DCP checkpoint, not a Hugging Face folder: use dcp-to-hf to convert it"
        )
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json: not a complete Hugging Face export")
    config = json.loads((folder / "config.json").read_text())
    tokenizers = [folder / f for f in TOKENIZER_FILES.values() if (folder / f).is_file()]
    if not tokenizers:
        raise ConversionError(f"{folder} has no tokenizer.json or tokenizer.model")
    return SafetensorsFolder(folder), config, tokenizers[0]


def hf_to_dcp(
    folder: str | Path,
    out: str | Path,
    *,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> Path:
    """An exported Hugging Face folder (``engram`` or ``deepseek_v3`` layout) back to a DCP
    checkpoint of one rank (``checkpoint.initial_load_path`` starts a job from it; DCP reshards
    it to any layout on load). Bit-exact with the checkpoint it was exported from."""
    from models.hf import layouts

    st, config, folder_tok = _hf_folder(folder)
    if "engram_pretrain" not in config:
        raise ConversionError(
            f"{folder}/config.json has no engram_pretrain section: only folders exported by "
            "dcp-to-hf carry the model settings this converter needs"
        )
    args = model_args_from_dict(config["engram_pretrain"]["model_args"])
    tok_path = Path(tokenizer) if tokenizer else folder_tok
    check_tokenizer(tok_path, config["engram_pretrain"].get("tokenizer_identity"), str(folder))
    hasher = hasher_for(args, tok_path)
    saved_hash = (config.get("engram") or {}).get("hash") if config.get("engram") else None
    check_hash_config(saved_hash, hasher, str(folder))
    hf = _folder_sources(st)
    if config.get("model_type") == "deepseek_v3":
        ours = layouts.from_v3(hf)
    elif config.get("model_type") == "engram_deepseek":
        ours = layouts.from_engram_hf(hf)
        if hasher is not None:
            stored = st.read(layouts.compressed_map_name(st.names())).numpy()
            if (stored != hasher.compressed_tokenizer.lookup_table).any():
                raise ConversionError(
                    f"{folder}: the stored Engram compressed map differs from the one its "
                    "tokenizer gives: the folder mixes files of two exports"
                )
    else:
        raise ConversionError(
            f"{folder}: model_type {config.get('model_type')!r} is not one this converter "
            "writes (engram_deepseek, deepseek_v3)"
        )
    expect_names(set(ours), _expected_names(args), str(folder))
    dtypes = {s.entry.dtype for s in ours.values() if s.entry.dtype.is_floating_point}
    if dtypes != {torch.float32}:
        log.warning(
            "%s holds %s weights; they are stored as they are", folder, sorted(map(str, dtypes))
        )
    meta = checkpoint_meta(args, hasher, tok_path, f"hf:{Path(folder).resolve()}")
    total = sum(s.entry.nbytes for s in ours.values())
    with atomic_folder(out, overwrite) as tmp, progress_bar(total, "hf-to-dcp") as bar:
        save_dcp(tmp, ours, meta, bar)
    return Path(out)


def save_model(model, args: ModelArgs, tokenizer_path: Path, out: str | Path, source: str) -> Path:
    """A one-rank DCP checkpoint of ``model``'s weights (a fresh initialisation, or weights made
    elsewhere), in the layout ``hf-to-dcp`` writes."""
    hasher = hasher_for(args, Path(tokenizer_path))
    sources = {k: constant(k, v.detach()) for k, v in model.state_dict().items()}
    meta = checkpoint_meta(args, hasher, Path(tokenizer_path), source)
    total = sum(s.entry.nbytes for s in sources.values())
    with atomic_folder(out) as tmp, progress_bar(total, "save") as bar:
        save_dcp(tmp, sources, meta, bar)
    return Path(out)


def _merge_into_base(
    base: DcpCheckpoint, replacements: dict[str, Source], where: str
) -> dict[str, Source]:
    """The base checkpoint's tensors with ``replacements`` (same names and shapes) swapped in."""
    ours = _dcp_sources(base)
    unknown = sorted(set(replacements) - set(ours))
    if unknown:
        raise ConversionError(
            f"{where}: {len(unknown)} tensors have no place in the base checkpoint's model "
            f"({', '.join(unknown[:4])}); the base must be the model these weights belong to"
        )
    for name, src in replacements.items():
        if src.entry.shape != ours[name].entry.shape:
            raise ConversionError(
                f"{where}: {name} is {list(src.entry.shape)} but the base model's is "
                f"{list(ours[name].entry.shape)} (another hash configuration or model width)"
            )
        ours[name] = cast(src, ours[name].entry.dtype)
    return ours


def _save_with_base_meta(base: DcpCheckpoint, ours: dict[str, Source], out, source, overwrite):
    meta = {**base.meta, "step": 0, "world_size": 1, "converted_from": source}
    total = sum(s.entry.nbytes for s in ours.values())
    with atomic_folder(out, overwrite) as tmp, progress_bar(total, "write dcp") as bar:
        save_dcp(tmp, ours, meta, bar)
    return Path(out)


def _reference_sources(path: Path) -> dict[str, Source]:
    """Tensors of a ``.safetensors``, ``.npz`` or ``.pt`` file, by name."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return _folder_sources(SafetensorsFolder(path))
    if path.suffix == ".npz":
        import numpy as np

        arrays = np.load(path)
        values = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    elif path.suffix in (".pt", ".pth", ".bin"):
        values = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:
        raise ConversionError(f"{path}: use a .safetensors, .npz or .pt file of reference weights")
    return {k: constant(k, v) for k, v in values.items()}


def reference_to_dcp(
    weights: str | Path, base: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Engram weights saved under the public reference module's names (``layer{L}.<name>`` or
    ``layers.{L}.engram.<name>``; ``models.engram.reference_state_dict_map``) into a copy of the
    ``base`` checkpoint, whose model has the same Engram configuration."""
    import re

    from models.engram import reference_state_dict_map

    base_ckpt = DcpCheckpoint(base)
    args = base_ckpt.model_args()
    if args.engram is None:
        raise ConversionError(f"the base checkpoint {base_ckpt.path} has no Engram layers")
    mapping = reference_state_dict_map(args.hc_mult, args.engram.variant)
    pattern = re.compile(r"^(?:layer(\d+)\.|layers\.(\d+)\.engram\.)(.+)$")
    replacements, unknown = {}, []
    for name, src in _reference_sources(Path(weights)).items():
        match = pattern.match(name)
        if match is None or match.group(3) not in mapping:
            unknown.append(name)
            continue
        layer = match.group(1) or match.group(2)
        ours = f"layers.{layer}.engram.{mapping[match.group(3)]}"
        replacements[ours] = src
    if unknown:
        raise ConversionError(
            f"{weights}: {len(unknown)} tensors are not reference Engram weights "
            f"({', '.join(sorted(unknown)[:4])}); expected layer{{L}}.<name> with names such as "
            + ", ".join(sorted(mapping)[:3])
        )
    layers = {name.split(".")[1] for name in replacements}
    expected = {f"layers.{layer}.engram.{v}" for layer in layers for v in mapping.values()}
    expect_names(set(replacements), expected, str(weights))
    return _save_with_base_meta(
        base_ckpt,
        _merge_into_base(base_ckpt, replacements, str(weights)),
        out,
        f"reference:{Path(weights).resolve()}",
        overwrite,
    )


def dcp_to_v41(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fp8: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30,
    overwrite: bool = False,
) -> Path:
    """The Engram layers of a ``v4.1``-variant checkpoint under DeepSeek-V4.1's names and shapes
    (FP8 E4M3 + E8M0 scales with ``fp8``, else in ``dtype``), with V4.1's config fields in
    ``config.json``."""
    from models.hf import layouts

    ckpt = DcpCheckpoint(checkpoint)
    args = ckpt.model_args()
    if args.engram is None or args.engram.variant != "v4.1":
        raise ConversionError(
            f"{ckpt.path}: the V4.1 layout holds Engram layers of the v4.1 variant (fused kv, no "
            f"conv); this model's is {args.engram.variant if args.engram else 'absent'}"
        )
    ours = {name: layouts.cast(src, dtype) for name, src in _dcp_sources(ckpt).items()}
    v41 = layouts.to_v41(ours, fp8)
    config = layouts.v41_config(args, ckpt.meta.get("engram_hash"))
    config["engram_pretrain"] = {"model_args": model_args_to_dict(args), "fp8": fp8}
    with atomic_folder(out, overwrite) as tmp:
        _write_hf(tmp, v41, config, max_shard_bytes, "dcp-to-v41")
    return Path(out)


def v41_to_dcp(
    folder: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """V4.1-layout Engram tensors (bf16, fp32 or FP8) into a copy of the ``base`` checkpoint;
    the hash configurations must agree."""
    from models.hf import layouts

    folder = Path(folder)
    base_ckpt = DcpCheckpoint(base)
    args = base_ckpt.model_args()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json: not a complete V4.1 export")
    config = json.loads(config_path.read_text())
    saved, current = config.get("engram_hash"), base_ckpt.meta.get("engram_hash")
    if saved is not None and current is not None:
        fields = hash_config_mismatches(saved, current)
        if fields:
            raise ConversionError(
                f"{folder} was made with another Engram hash configuration than {base_ckpt.path} "
                f"(differs in: {', '.join(fields)}): its tables would be read with wrong ids"
            )
    if args.engram is None or args.engram.variant != "v4.1":
        raise ConversionError(f"the base checkpoint {base_ckpt.path} has no v4.1 Engram layers")
    ours = layouts.from_v41(_folder_sources(SafetensorsFolder(folder)))
    return _save_with_base_meta(
        base_ckpt,
        _merge_into_base(base_ckpt, ours, str(folder)),
        out,
        f"v4.1:{folder.resolve()}",
        overwrite,
    )
