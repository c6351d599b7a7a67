"""Architecture registry: HF `architectures` name -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from runtime.models.gpt2 import GPT2LMHeadModel
from runtime.models.llama import LlamaForCausalLM
from sharding.rules import architecture_of

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}


def model_class(hf_config: dict[str, Any]) -> type[nn.Module]:
    """The model class for a checkpoint's config; unsupported ones get an error listing ours."""
    return MODELS[architecture_of(hf_config)]
