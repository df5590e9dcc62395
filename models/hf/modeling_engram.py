"""transformers glue for an Engram model exported by engram-pretrain (remote code).

An exported folder carries this file beside the framework's own model files (``transformer.py``,
``attention.py``, ``engram.py``, ... and the hasher ``ngram_hash.py``), copied by
``models/hf/remote_code.py`` with their imports made relative. Here is only what transformers
needs around that model: the config, the ``PreTrainedModel``, ``GenerationMixin`` and a cache
adapter. ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` then runs the
code that trained the weights, with nothing but torch and transformers installed.

The model hashes ``input_ids`` itself with the exported hash configuration (``config.engram
["hash"]``) and compressed map (the ``engram_compressed_map`` buffer). During ``generate()`` the
cache (the framework's ``KVCache``) carries the attention state, the last N-1 ids and every Engram
layer's convolution context, so each new token is hashed and convolved incrementally.

Legend: B batch, T positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from data.ngram_hash import CompressedTokenizer, NgramHasher
from models.args import ModelArgs, model_args_from_dict
from models.kv_cache import KVCache
from models.transformer import Transformer


class EngramDeepseekConfig(PretrainedConfig):
    """HF's usual names (``hidden_size``, ... for tooling) plus what builds the model:
    ``engram_pretrain["model_args"]`` (the framework's ``ModelArgs``) and ``engram["hash"]``
    (the full hash configuration; None: no Engram layers)."""

    model_type = "engram_deepseek"

    def __init__(
        self,
        engram_pretrain: dict | None = None,
        engram: dict | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.engram_pretrain = engram_pretrain or {}
        self.engram = engram
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def model_args(self) -> ModelArgs:
        if "model_args" not in self.engram_pretrain:
            raise ValueError(
                "config.json has no engram_pretrain.model_args: export the checkpoint with "
                "engram-pretrain's dcp-to-hf, which writes the model's settings there"
            )
        return model_args_from_dict(self.engram_pretrain["model_args"])


class EngramCache(KVCache):
    """The framework's decoding state under the name transformers' generation loop asks for."""

    is_compileable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class EngramDeepseekForCausalLM(PreTrainedModel, GenerationMixin):
    """The framework's ``Transformer`` under ``model.``, hashing its own inputs."""

    config_class = EngramDeepseekConfig
    base_model_prefix = "model"
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: EngramDeepseekConfig):
        super().__init__(config)
        self.model = Transformer(config.model_args())
        if config.engram is not None:  # raw id -> compressed id, saved with the weights
            size = config.engram["compressed_map_size"]  # the tokenizer's ids
            self.register_buffer("engram_compressed_map", torch.zeros(size, dtype=torch.long))
        self._hasher: NgramHasher | None = None
        self._ready = False
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is ours (forward makes it), not transformers' DynamicCache

    def _init_weights(self, module):
        """A fresh model (``from_config``) gets the framework's own initialisation; exported
        folders carry every weight."""
        if isinstance(module, Transformer):
            module.init_weights()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.model.output

    def _prepare(self) -> None:
        """Once, after loading: the non-persistent buffers (RoPE tables, table offsets), and the
        hasher from the exported configuration, which checks the compressed map against it."""
        if self._ready:
            return
        self.model.init_buffers()
        if self.config.engram is not None:
            lookup = CompressedTokenizer(self.engram_compressed_map.detach().cpu().numpy())
            try:
                self._hasher = NgramHasher.from_config_dict(self.config.engram["hash"], lookup)
            except ValueError as err:
                raise ValueError(
                    f"{err}. The weights and config.json come from different exports; export "
                    "the checkpoint again"
                ) from err
        self._ready = True

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EngramCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``attention_mask`` may only mark every position (no padding): an Engram n-gram and
        the convolution run over positions, so a batch of prompts must have equal lengths."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "padded batches are not supported: Engram's n-grams and convolution look back "
                "over positions; generate prompts of equal length, or one at a time"
            )
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise ValueError(
                f"past_key_values is a {type(past_key_values).__name__}: pass the cache this "
                "model returned (past_key_values of its last output), which holds its Engram state"
            )
        self._prepare()
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = (past_key_values or EngramCache()) if use_cache else None
        engram = None
        if self._hasher is not None:  # a fresh cache hashes a whole sequence
            engram = (cache or KVCache()).hash_ids(self._hasher, input_ids)
        logits = self.model(input_ids, engram=engram, cache=cache).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
